// Placeholder translation unit for the attention kernel family; filled in by its own change.
#include "common.h"

namespace mp {

void register_attention(Napi::Env, Napi::Object) {}

}  // namespace mp
