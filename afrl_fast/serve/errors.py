"""The service's errors and their one JSON shape, OpenAI's: {"error": {"message", "type", "param",
"code"}}. No web framework here: the handlers that turn these into responses live in `app`."""


class ServeError(ValueError):
    """A model folder, flag or backend the service cannot start with; the message says why (one line)."""


class ApiError(Exception):
    """A request answered with `status` and the error body; `param` names the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_value",
                 headers: dict | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.param, self.code, self.kind)


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def field_path(loc) -> str:
    """("body", "pairs", 3, "query") -> "pairs[3].query"."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def invalid(errors: list[dict]) -> ApiError:
    """The 422 for a request pydantic refused: its first problem, by field, and how many more."""
    param, message = validation_message(errors[0]) if errors else ("body", "invalid request")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ApiError(422, message, param, "invalid_value")


def validation_message(err: dict) -> tuple[str, str]:
    """(param, one-line message) for the first pydantic error of a request."""
    param = field_path(err.get("loc", ()))
    if err.get("type") == "json_invalid":
        return "body", f"body: invalid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})"
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        msg = "required field missing"
    return param, f"{param}: {msg}"


def not_utf8(body: bytes) -> ApiError | None:
    """The 400 for a body that is not UTF-8 (JSON must be, RFC 8259), naming the first bad byte;
    None when it is UTF-8. Only called once the JSON parser refused the body, so valid requests
    pay nothing for it."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return ApiError(400, f"body: not valid UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start}: {e.reason}); "
                             "send the JSON encoded as UTF-8", "body", "invalid_encoding")
    return None


def unknown_model(name: str, served: str) -> ApiError:
    """OpenAI's answer to a model it does not serve: 404, code model_not_found (answering it with
    the served model would hide a client's wrong configuration)."""
    return ApiError(404, f"model: the model {name!r} does not exist; this server serves {served!r}", "model",
                    "model_not_found")
