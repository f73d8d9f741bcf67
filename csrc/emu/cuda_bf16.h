// CUDA emulation: see types.h.
#pragma once
#include "emu/types.h"
