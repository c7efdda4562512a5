// Placeholder translation unit for the optim kernel family; filled in by its own change.
#include "common.h"

namespace mp {

void register_optim(Napi::Env, Napi::Object) {}

}  // namespace mp
