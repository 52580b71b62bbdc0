"""JSON schemas the structured-output benchmarks share: a realistic 30-field record and a long-answer list."""

from __future__ import annotations

import copy

_ADDRESS = {
    "type": "object",
    "properties": {
        "street": {"type": "string", "maxLength": 80},
        "city": {"type": "string", "maxLength": 40},
        "postal_code": {"type": "string", "pattern": "^[0-9]{5}$"},
        "country": {"type": "string", "enum": ["US", "CA", "GB", "DE", "FR", "JP"]},
    },
    "required": ["street", "city", "postal_code", "country"],
    "additionalProperties": False,
}


def customer_record_schema() -> dict:
    """30 top-level fields of the kinds a real API returns: bounded numbers, enums, patterns, dates,
    nested objects, arrays of objects, optional fields."""
    props = {
        "id": {"type": "integer", "minimum": 1},
        "uuid": {"type": "string", "format": "uuid"},
        "first_name": {"type": "string", "minLength": 1, "maxLength": 40},
        "last_name": {"type": "string", "minLength": 1, "maxLength": 40},
        "email": {"type": "string", "format": "email"},
        "phone": {"type": "string", "pattern": "^\\+?[0-9]{7,15}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "birth_date": {"type": "string", "format": "date"},
        "created_at": {"type": "string", "format": "date-time"},
        "is_active": {"type": "boolean"},
        "plan": {"type": "string", "enum": ["free", "starter", "pro", "enterprise"]},
        "seats": {"type": "integer", "minimum": 1, "maximum": 10000},
        "monthly_spend": {"type": "number", "minimum": 0},
        "discount": {"type": "number", "minimum": 0, "maximum": 1},
        "currency": {"type": "string", "enum": ["USD", "EUR", "GBP", "JPY"]},
        "billing_address": _ADDRESS,
        "shipping_address": copy.deepcopy(_ADDRESS),
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 8},
        "scores": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 5},
        "preferences": {
            "type": "object",
            "properties": {"newsletter": {"type": "boolean"},
                           "language": {"type": "string", "enum": ["en", "de", "fr", "ja"]},
                           "theme": {"type": "string", "enum": ["light", "dark"]}},
            "required": ["newsletter", "language"],
            "additionalProperties": False,
        },
        "orders": {
            "type": "array",
            "maxItems": 10,
            "items": {
                "type": "object",
                "properties": {"order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
                               "amount": {"type": "number", "minimum": 0},
                               "status": {"type": "string", "enum": ["pending", "shipped", "delivered", "returned"]},
                               "items": {"type": "integer", "minimum": 1}},
                "required": ["order_id", "amount", "status"],
                "additionalProperties": False,
            },
        },
        "notes": {"anyOf": [{"type": "string", "maxLength": 200}, {"type": "null"}]},
        "referrer": {"type": ["string", "null"]},
        "company": {"type": "string", "maxLength": 60},
        "job_title": {"type": "string", "maxLength": 60},
        "timezone": {"type": "string", "pattern": "^[A-Za-z]+/[A-Za-z_]+$"},
        "login_count": {"type": "integer", "minimum": 0},
        "last_login_ip": {"type": "string", "format": "ipv4"},
        "rating": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
        "verified": {"const": True},
    }
    assert len(props) == 30
    required = ["id", "uuid", "first_name", "last_name", "email", "age", "created_at", "is_active", "plan",
                "seats", "currency", "billing_address", "tags", "preferences", "orders", "rating", "verified"]
    return {"title": "CustomerRecord", "type": "object", "properties": props, "required": required,
            "additionalProperties": False}


def customer_record_example() -> dict:
    """One instance of customer_record_schema (the mask-fill benchmark walks its tokens)."""
    addr = {"street": "12 Main Street", "city": "Springfield", "postal_code": "12345", "country": "US"}
    return {"id": 42, "uuid": "123e4567-e89b-12d3-a456-426614174000", "first_name": "Ada", "last_name": "Lovelace",
            "email": "ada@example.com", "phone": "+15551234567", "age": 36, "birth_date": "1815-12-10",
            "created_at": "2024-01-02T03:04:05Z", "is_active": True, "plan": "pro", "seats": 12,
            "monthly_spend": 1234.5, "discount": 0.15, "currency": "USD", "billing_address": addr,
            "shipping_address": addr, "tags": ["vip", "beta"], "scores": [0.5, 0.75],
            "preferences": {"newsletter": True, "language": "en", "theme": "dark"},
            "orders": [{"order_id": "ORD-000123", "amount": 99.99, "status": "shipped", "items": 2},
                       {"order_id": "ORD-000124", "amount": 15.0, "status": "pending", "items": 1}],
            "notes": None, "referrer": "newsletter", "company": "Analytical Engines Ltd", "job_title": "Engineer",
            "timezone": "Europe/London", "login_count": 1000, "last_login_ip": "192.168.0.1", "rating": 5,
            "verified": True}


def records_list_schema() -> dict:
    """An array of short records: answers run as long as max_tokens lets them (the engine benchmark's schema)."""
    record = {"type": "object",
              "properties": {"name": {"type": "string", "maxLength": 24},
                             "city": {"type": "string", "maxLength": 24},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120},
                             "active": {"type": "boolean"}},
              "required": ["name", "city", "age", "active"], "additionalProperties": False}
    return {"type": "object", "properties": {"people": {"type": "array", "items": record, "minItems": 50}},
            "required": ["people"], "additionalProperties": False}
