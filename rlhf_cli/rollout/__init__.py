"""Online stages' shared parts (PPO today; rejection sampling, GRPO/RLOO and `rlhf eval` use the same):

- generation.py: sampling (left-padded prompts, stop at EOS) and log-probs read back;
- rewards.py: reward sources behind one `score` interface (a reward model / classifier, or a Python function);
- scoring.py: `score_responses`, raw scores and their shaping (normalisation, clipping, missing-EOS rule);
- experience.py: `collect` (N samples per prompt, optional critic and reference), PPO's `advantages`;
- update.py: the actor's and the critic's optimizer steps;
- online.py: the frozen reference, reward statistics, rollout metrics, timing, sample rows;
- evaluation.py: `evaluate_policy`, held-out evaluation of a training engine or a frozen model;
- controllers.py: the KL coefficient and the running moments (checkpointed state);
- selection.py, best_of_n.py: rejection sampling's candidate selection and its resumable rounds.
"""
