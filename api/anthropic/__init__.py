"""Anthropic's Messages API behind the OpenAI chat.completions surface (issue 22).

Four translations, each a module with one concern:

- `request.to_messages_request(body, upstream_model)`: an OpenAI chat request (bytes) → the
  Messages request body (bytes); a request that cannot be translated is an `ApiError` 400.
- `response.to_openai_response(body, model)`: a Messages answer → a chat.completion (bytes) and its
  `Usage` for billing.
- `stream.StreamTranslator`: Anthropic's SSE events, fed as bytes, → chat.completion.chunk events.
- `errors.to_openai_error(status, body)`: an Anthropic error → the OpenAI envelope and the status
  LiteLLM answers with.

`wire.py` holds the request side of Anthropic's format and what to send it (path, headers).
"""
