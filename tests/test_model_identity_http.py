"""End to end: the default model's identities over HTTP, adapters trained elsewhere, system_fingerprint.

A real `loraplex serve` of the default model with aliases. Adapters are PEFT folders whose
`base_model_name_or_path` is what PEFT, TRL, Axolotl and Unsloth write (the Hub id), in other letter case, a
path of another machine, our API name and an alias; they load through `POST /v1/adapters` and answer as HF +
PEFT do. Another model's id is refused (both names in the message) unless `force`; wrong shapes are refused
even with it. The server is started twice on the same config: system_fingerprint stays, and the forced
adapter comes back from the registry still marked forced.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import make_lora_adapter
from tests.serve_helpers import Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODEL = "smollm2-135m-instruct"
HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
CONFIG = f"""
models:
  - name: {MODEL}
    aliases: [smollm2, small-chat]
    dtype: float32  # exact against PEFT
    max_model_len: 1024
    kv_cache_memory: 128MiB
    ray_actor_options: {{num_cpus: 0}}
embeddings: {{enabled: false}}
rag: {{enabled: false}}
fine_tuning: {{enabled: false}}
governance: {{open_access: true}}
"""
BASES = {"hub": HUB, "lower": HUB.lower(), "elsewhere": "/mnt/checkpoints/smol-copy", "api": MODEL, "alias": "small-chat"}
MESSAGES = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, default_model_path, tiny_model_factory):
    tmp = tmp_path_factory.mktemp("identity")
    first = Server(tmp / "one", CONFIG)
    root = first.home / "adapters"
    folders = {name: make_lora_adapter(default_model_path, root / name, 4, seed=20 + i, std=0.05, base_name=base,
                                       targets=["q_proj", "v_proj"])
               for i, (name, base) in enumerate(BASES.items())}
    folders["other"] = make_lora_adapter(default_model_path, root / "other", 4, seed=30, std=0.05,
                                         base_name="meta-llama/Llama-3.1-8B", targets=["q_proj", "v_proj"])
    folders["wide"] = make_lora_adapter(tiny_model_factory("llama"), root / "wide", 4, seed=31, base_name=HUB)
    first.start()
    try:
        yield first, folders, tmp
    finally:
        first.stop()


def peft_text(folder: str | None, n: int) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.models import resolve_model

    path = resolve_model(MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if folder:
        model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    ids = tok(tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.eval().generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def chat(server, model, n=8, **kw):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=n, temperature=0, **kw)


def test_every_name_of_the_model_is_accepted_and_listed(setup):
    server = setup[0]
    want = peft_text(None, 8)
    for name in (MODEL, HUB, HUB.upper(), "smollm2", "small-chat"):
        r = chat(server, name)
        assert r.choices[0].message.content == want, name
    cards = {c["id"]: c for c in httpx.get(server.base + "/v1/models").json()["data"]}
    assert cards[MODEL]["root"] == HUB and cards[MODEL]["aliases"] == ["smollm2", "small-chat"]
    for name in (HUB, "smollm2"):
        assert httpx.get(f"{server.base}/v1/models/{name}").json()["id"] == MODEL


def test_adapters_trained_elsewhere_load_and_match_peft(setup):
    server, folders, _ = setup
    api = httpx.Client(base_url=server.base, timeout=120)
    for name in BASES:
        r = api.post("/v1/adapters", json={"name": name, "source": folders[name]})
        assert r.status_code == 200, (name, r.text)
        card = r.json()
        assert card["forced"] is False and card["declared_base"] == BASES[name]
        assert (card["warnings"] == []) == (name != "elsewhere"), card["warnings"]
        assert chat(server, name).choices[0].message.content == peft_text(folders[name], 8), name
        models = {c["id"]: c for c in httpx.get(server.base + "/v1/models").json()["data"]}
        assert models[f"{MODEL}:{name}"]["parent"] == MODEL
    # The base named by a path of another machine: loaded on its shapes, with a warning that says so.
    warned = api.get("/v1/adapters/elsewhere").json()["warnings"]
    assert len(warned) == 1 and "/mnt/checkpoints/smol-copy" in warned[0] and "not on this server" in warned[0]
    assert "/mnt/checkpoints/smol-copy" in server.tail(200_000)  # and in the log


def test_another_models_adapter_is_refused_unless_forced_and_wrong_shapes_always(setup):
    server, folders, _ = setup
    api = httpx.Client(base_url=server.base, timeout=120)
    r = api.post("/v1/adapters", json={"name": "other", "source": folders["other"]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "adapter_base_mismatch" and err["param"] == "source"
    assert "meta-llama/Llama-3.1-8B" in err["message"] and MODEL in err["message"] and HUB in err["message"]
    assert "other" not in {a["name"] for a in api.get("/v1/adapters").json()["data"]}
    bad = api.post("/v1/adapters", json={"name": "other", "source": folders["other"], "force": "yes"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "force"
    forced = api.post("/v1/adapters", json={"name": "other", "source": folders["other"], "force": True})
    assert forced.status_code == 200, forced.text
    card = forced.json()
    assert card["forced"] is True and "meta-llama/Llama-3.1-8B" in card["warnings"][0]
    assert chat(server, "other").choices[0].message.content == peft_text(folders["other"], 8)
    for force in (False, True):
        wide = api.post("/v1/adapters", json={"name": "wide", "source": folders["wide"], "force": force})
        assert wide.status_code == 400 and "has shape" in wide.json()["error"]["message"], wide.text
    assert "wide" not in {a["name"] for a in api.get("/v1/adapters").json()["data"]}
    assert chat(server, MODEL, n=2).choices  # still serving


def _fingerprints(server) -> set[str]:
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    seen = [chat(server, MODEL, n=3).system_fingerprint]
    seen += [c.system_fingerprint for c in chat(server, MODEL, n=3, stream=True,
                                                 stream_options={"include_usage": True})]
    seen.append(client.completions.create(model=MODEL, prompt="Hello", max_tokens=3).system_fingerprint)
    seen += [c.system_fingerprint for c in client.completions.create(model=MODEL, prompt="Hi", max_tokens=3,
                                                                      stream=True)]
    assert all(isinstance(f, str) and f.startswith("fp_") for f in seen), seen
    return set(seen)


def test_system_fingerprint_everywhere_and_stable_across_restarts(setup):
    first, _, tmp = setup
    before = _fingerprints(first)
    assert len(before) == 1
    first.stop()
    (tmp / "two").mkdir()
    second = Server(tmp / "two", CONFIG, home=first.home).start()
    try:
        assert _fingerprints(second) == before
        # Adapters added through the API come back from the registry, the forced one still marked forced.
        cards = {a["name"]: a for a in httpx.get(second.base + "/v1/adapters").json()["data"]}
        assert set(BASES) | {"other"} <= set(cards)
        assert cards["other"]["forced"] is True and cards["hub"]["forced"] is False
    finally:
        second.stop()
