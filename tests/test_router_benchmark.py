"""benchmarks/routing.py runs end to end on a short simulated workload; the router beats the baselines."""

import json

from benchmarks import routing


def test_routing_benchmark_short_run(tmp_path, capsys):
    assert routing.main(["--duration", "30", "--out", str(tmp_path)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    res = line["results"]
    assert set(res) == {"cheapest", "fastest", "balanced", "slo", "always-largest", "round-robin"}
    assert (tmp_path / "routing.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "routing.json").read_text())["results"] == res
    assert all(r["requests"] == line["requests"] > 100 for r in res.values())
    # the policies do what they say on a seeded (deterministic) simulation
    assert res["cheapest"]["cost_per_1k_usd"] == min(r["cost_per_1k_usd"] for r in res.values())
    assert res["slo"]["cost_per_1k_usd"] < res["fastest"]["cost_per_1k_usd"]
    assert res["slo"]["slo_attainment"] > res["cheapest"]["slo_attainment"]
    assert res["slo"]["slo_attainment"] > res["round-robin"]["slo_attainment"]
    assert res["always-largest"]["cost_vs_largest"] == 1.0
    assert res["slo"]["cost_per_1k_usd"] < 0.5 * res["always-largest"]["cost_per_1k_usd"]
    # quality floors are honoured by the router, not by round-robin
    assert all(res[p]["quality_floor_violations"] == 0 for p in ("cheapest", "fastest", "balanced", "slo"))
    assert res["round-robin"]["quality_floor_violations"] > 0
