"""The stages: one module per stage (`rlhf_cli.stages.<name>` with `run(cfg, run)`), their shared training loop
(common.py) and batch algebra (plan.py). The registry that names them, their schemas, choices and ranges is
rlhf_cli/registry.py."""
