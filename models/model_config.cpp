#include "models/model_config.h"

namespace moetrain {

const char* scoring_func_name(ScoringFunc f) {
  return f == ScoringFunc::kSigmoid ? "sigmoid" : "softmax";
}

}  // namespace moetrain
