"""Semi-supervised baselines of the paper's Tables 1 and 2, each step checked against DHC's public code
(xmed-lab/DHC, ``code/train_<method>.py``): see docs/methods.md. Not wired into the trainer yet."""
