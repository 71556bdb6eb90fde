"""Slot indices of the per-step scalar vector (NOTE [per-step scalars are data]).

Keep in sync with fusedmf/functional/scalars.py (SGD_SLOTS / ADAM_SLOTS) and csrc/update_math.h.
This package must not import fusedmf (it is also imported stand-alone as ``triton_kernels``), so
the layout is copied here; tests/test_triton.py asserts that the two copies agree.
"""

# keep in sync with fusedmf/functional/scalars.py
SGD_SLOTS = (
    "lr",
    "momentum",
    "one_minus_dampening",
    "l2_weight_decay",
    "decay_factor",
    "nesterov",
    "first_step",
)
SGD_LR = 0
SGD_MOMENTUM = 1
SGD_ONE_MINUS_DAMPENING = 2
SGD_L2_WEIGHT_DECAY = 3
SGD_DECAY_FACTOR = 4
SGD_NESTEROV = 5
SGD_FIRST_STEP = 6
SGD_NUM_SCALARS = 7

# keep in sync with fusedmf/functional/scalars.py
ADAM_SLOTS = (
    "lr",
    "beta1",
    "one_minus_beta1",
    "beta2",
    "one_minus_beta2",
    "eps",
    "l2_weight_decay",
    "decay_factor",
    "neg_step_size",
    "bias_correction2_sqrt",
)
ADAM_LR = 0
ADAM_BETA1 = 1
ADAM_ONE_MINUS_BETA1 = 2
ADAM_BETA2 = 3
ADAM_ONE_MINUS_BETA2 = 4
ADAM_EPS = 5
ADAM_L2_WEIGHT_DECAY = 6
ADAM_DECAY_FACTOR = 7
ADAM_NEG_STEP_SIZE = 8
ADAM_BIAS_CORRECTION2_SQRT = 9
ADAM_NUM_SCALARS = 10

# keep in sync with fusedmf/functional/scalars.py
SMEGA2_SLOTS = (
    "lr",
    "momentum",
    "momentum_scale",
    "l2_weight_decay",
    "cycle_end",
)
SMEGA2_LR = 0
SMEGA2_MOMENTUM = 1
SMEGA2_MOMENTUM_SCALE = 2
SMEGA2_L2_WEIGHT_DECAY = 3
SMEGA2_CYCLE_END = 4
SMEGA2_NUM_SCALARS = 5

# keep in sync with fusedmf/functional/scalars.py
SMEGA2_ESTIMATE_SLOTS = (
    "accumulator_coef",
    "momentum_coef",
)
SMEGA2_ESTIMATE_ACCUMULATOR_COEF = 0
SMEGA2_ESTIMATE_MOMENTUM_COEF = 1
SMEGA2_ESTIMATE_NUM_SCALARS = 2


def _check_consistent() -> None:
    # The named indices and the slot tuples are two spellings of one layout: make them agree here,
    # at import, so a one-sided edit fails immediately rather than producing wrong updates.
    for prefix, slots, count in (("SGD_", SGD_SLOTS, SGD_NUM_SCALARS), ("ADAM_", ADAM_SLOTS, ADAM_NUM_SCALARS),
                                 ("SMEGA2_", SMEGA2_SLOTS, SMEGA2_NUM_SCALARS),
                                 ("SMEGA2_ESTIMATE_", SMEGA2_ESTIMATE_SLOTS, SMEGA2_ESTIMATE_NUM_SCALARS)):
        assert len(slots) == count, (prefix, len(slots), count)
        for i, name in enumerate(slots):
            assert globals()[prefix + name.upper()] == i, (prefix + name.upper(), i)


_check_consistent()
