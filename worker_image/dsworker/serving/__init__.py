"""Rank 0's OpenAI-compatible HTTP API. Torch-free: it talks to the engine through request types.

`app` is the factory; `routers/` holds one thin router per endpoint family; `endpoint` frames
every POST (ready check, bounded `body`, counting, `errors` as OpenAI's JSON); `prompts` turns a
validated request into engine requests; `dispatch` submits them and collects the answers,
`streaming` sends them as server-sent events; `grammar_pool` compiles guided decoding's grammars;
`state` is what all of them share; `protocol/` the request schemas and response shapes.
"""
