// Placeholder translation unit for the index kernel family; filled in by its own change.
#include "common.h"

namespace mp {

void register_index(Napi::Env, Napi::Object) {}

}  // namespace mp
