"""Text in and out of the model, torch-free: tokenizer, chat template, tool calls, the reasoning
split, grammar specs and the assistant message a choice becomes.
"""
