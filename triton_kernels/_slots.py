"""Slot indices of the per-step scalar vector (NOTE [per-step scalars are data]).

NOTE [one scalar layout]: the layout lives in fusedmf/functional/scalars.py (SGD_SLOTS /
ADAM_SLOTS); the indices here are looked up there by name, so the Triton kernels cannot drift from
it. (csrc/update_math.h has its own constants; fusedmf/functional/_ops.py checks them by name.)
"""

from fusedmf.functional.scalars import ADAM_SLOTS, SGD_SLOTS, SMEGA2_ESTIMATE_SLOTS, SMEGA2_SLOTS

SGD_SLOT_INDEX = {name: i for i, name in enumerate(SGD_SLOTS)}
ADAM_SLOT_INDEX = {name: i for i, name in enumerate(ADAM_SLOTS)}

SGD_LR = SGD_SLOT_INDEX["lr"]
SGD_MOMENTUM = SGD_SLOT_INDEX["momentum"]
SGD_ONE_MINUS_DAMPENING = SGD_SLOT_INDEX["one_minus_dampening"]
SGD_L2_WEIGHT_DECAY = SGD_SLOT_INDEX["l2_weight_decay"]
SGD_DECAY_FACTOR = SGD_SLOT_INDEX["decay_factor"]
SGD_NESTEROV = SGD_SLOT_INDEX["nesterov"]
SGD_FIRST_STEP = SGD_SLOT_INDEX["first_step"]
SGD_MAXIMIZE = SGD_SLOT_INDEX["maximize"]
SGD_NUM_SCALARS = len(SGD_SLOTS)

ADAM_LR = ADAM_SLOT_INDEX["lr"]
ADAM_BETA1 = ADAM_SLOT_INDEX["beta1"]
ADAM_ONE_MINUS_BETA1 = ADAM_SLOT_INDEX["one_minus_beta1"]
ADAM_BETA2 = ADAM_SLOT_INDEX["beta2"]
ADAM_ONE_MINUS_BETA2 = ADAM_SLOT_INDEX["one_minus_beta2"]
ADAM_EPS = ADAM_SLOT_INDEX["eps"]
ADAM_L2_WEIGHT_DECAY = ADAM_SLOT_INDEX["l2_weight_decay"]
ADAM_DECAY_FACTOR = ADAM_SLOT_INDEX["decay_factor"]
ADAM_NEG_STEP_SIZE = ADAM_SLOT_INDEX["neg_step_size"]
ADAM_BIAS_CORRECTION2_SQRT = ADAM_SLOT_INDEX["bias_correction2_sqrt"]
ADAM_MAXIMIZE = ADAM_SLOT_INDEX["maximize"]
ADAM_NUM_SCALARS = len(ADAM_SLOTS)

SMEGA2_SLOT_INDEX = {name: i for i, name in enumerate(SMEGA2_SLOTS)}
SMEGA2_LR = SMEGA2_SLOT_INDEX["lr"]
SMEGA2_MOMENTUM = SMEGA2_SLOT_INDEX["momentum"]
SMEGA2_MOMENTUM_SCALE = SMEGA2_SLOT_INDEX["momentum_scale"]
SMEGA2_L2_WEIGHT_DECAY = SMEGA2_SLOT_INDEX["l2_weight_decay"]
SMEGA2_CYCLE_END = SMEGA2_SLOT_INDEX["cycle_end"]
SMEGA2_MAXIMIZE = SMEGA2_SLOT_INDEX["maximize"]
SMEGA2_NUM_SCALARS = len(SMEGA2_SLOTS)

SMEGA2_ESTIMATE_SLOT_INDEX = {name: i for i, name in enumerate(SMEGA2_ESTIMATE_SLOTS)}
SMEGA2_ESTIMATE_ACCUMULATOR_COEF = SMEGA2_ESTIMATE_SLOT_INDEX["accumulator_coef"]
SMEGA2_ESTIMATE_MOMENTUM_COEF = SMEGA2_ESTIMATE_SLOT_INDEX["momentum_coef"]
SMEGA2_ESTIMATE_NUM_SCALARS = len(SMEGA2_ESTIMATE_SLOTS)
