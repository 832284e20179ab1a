"""The serving engine around the model: torch-free request types, step types, admission, scheduler
and KV pages; the step wire and control channel; the per-rank setup, model runner and weight loader
(weight files, host-to-device copies); sampling, grammar masks, live requests and the step loop.
"""
