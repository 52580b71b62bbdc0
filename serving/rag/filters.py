"""Metadata filters for queries, matched against each document's metadata (its chunks inherit it).

    {"lang": "en"}                          equality (all keys must match)
    {"year": {"$gte": 2020, "$lt": 2025}}   operators: $eq $ne $in $nin $gt $gte $lt $lte $exists
    {"$or": [{"lang": "en"}, {"lang": "de"}]}, {"$and": [...]}, {"$not": {...}}
"""

from __future__ import annotations

from serving.rag.errors import InvalidInputError

_OPS = ("$eq", "$ne", "$in", "$nin", "$gt", "$gte", "$lt", "$lte", "$exists")
_SCALAR = (str, int, float, bool, type(None))


def check_filter(flt, param: str = "filter") -> None:
    """Raise InvalidInputError naming the offending path for anything malformed."""
    if flt is None:
        return
    if not isinstance(flt, dict):
        raise InvalidInputError(f"{param} must be an object", param=param)
    for key, cond in flt.items():
        where = f"{param}.{key}"
        if key in ("$and", "$or"):
            if not isinstance(cond, list) or not cond:
                raise InvalidInputError(f"{where} must be a non-empty list of filters", param=where)
            for i, sub in enumerate(cond):
                check_filter(sub, f"{where}[{i}]")
        elif key == "$not":
            check_filter(cond, where)
        elif key.startswith("$"):
            raise InvalidInputError(f"unknown filter operator {key!r} (use $and, $or, $not at the top)", param=where)
        elif isinstance(cond, dict):
            if not cond:
                raise InvalidInputError(f"{where} must not be empty", param=where)
            for op, value in cond.items():
                if op not in _OPS:
                    raise InvalidInputError(f"unknown filter operator {op!r} in {where}; use one of "
                                            f"{', '.join(_OPS)}", param=f"{where}.{op}")
                if op in ("$in", "$nin") and not (isinstance(value, list) and all(isinstance(v, _SCALAR)
                                                                                  for v in value)):
                    raise InvalidInputError(f"{where}.{op} must be a list of scalars", param=f"{where}.{op}")
                if op in ("$gt", "$gte", "$lt", "$lte") and not (isinstance(value, (int, float, str))
                                                                 and not isinstance(value, bool)):
                    raise InvalidInputError(f"{where}.{op} must be a number or string", param=f"{where}.{op}")
                if op == "$exists" and not isinstance(value, bool):
                    raise InvalidInputError(f"{where}.$exists must be true or false", param=f"{where}.{op}")
        elif not isinstance(cond, _SCALAR + (list,)):
            raise InvalidInputError(f"{where} must be a scalar or an operator object", param=where)


def _compare(a, op: str, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None:
        return False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) or isinstance(a, str) and isinstance(b, str):
        return {"$gt": a > b, "$gte": a >= b, "$lt": a < b, "$lte": a <= b}[op]
    return False


def _match_value(meta: dict, key: str, cond) -> bool:
    present, value = key in meta, meta.get(key)
    if not isinstance(cond, dict):
        # A list-valued field matches a scalar it contains.
        return present and (value == cond or (isinstance(value, list) and cond in value))
    for op, arg in cond.items():
        if op == "$exists":
            ok = present == arg
        elif op == "$eq":
            ok = present and value == arg
        elif op == "$ne":
            ok = not present or value != arg
        elif op == "$in":
            ok = present and value in arg
        elif op == "$nin":
            ok = not present or value not in arg
        else:
            ok = present and _compare(value, op, arg)
        if not ok:
            return False
    return True


def matches(meta: dict, flt: dict | None) -> bool:
    if not flt:
        return True
    for key, cond in flt.items():
        if key == "$and":
            ok = all(matches(meta, sub) for sub in cond)
        elif key == "$or":
            ok = any(matches(meta, sub) for sub in cond)
        elif key == "$not":
            ok = not matches(meta, cond)
        else:
            ok = _match_value(meta, key, cond)
        if not ok:
            return False
    return True
