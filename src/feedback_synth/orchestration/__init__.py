"""Running the stages: the stage table both runners are built from, the in-process runner, what both runners share, pre-flight checks and the pilot."""

# The pilot's folds of train + val (here, not in tune.py, so that the command line reads it without
# importing the pilot). 5, not 3: with 3 folds a percentile CI excludes zero only when every fold
# gains, and on digits-gap one fold of three missed the 5-seed test benchmark's gain; with 5 folds the
# pilot's choice held on digits-lt, digits-gap and digits-groups (benchmarks/results/
# pilot_check_round17*.md, pilot_check_round18_digits_groups_5_folds.md).
DEFAULT_FOLDS = 5
