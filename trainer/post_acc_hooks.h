// defines: install_post_acc_grad_hooks — one post-accumulation hook per parameter, for the
// objects that act as each gradient becomes final during a backward (GradReducer,
// GradNormTracker). A parameter holds one such hook, so a second owner is refused rather than
// silently replacing the first.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/torch.h>

namespace moetrain {

// params[i] gets make_hook(i) (a std::unique_ptr<PostAccumulateGradHook>); throws
// std::invalid_argument naming `owner`, before installing any, if one already has a hook.
template <class MakeHook>
void install_post_acc_grad_hooks(const std::vector<torch::Tensor>& params, const std::string& owner,
                                 MakeHook make_hook) {
  for (const auto& p : params)
    if (torch::autograd::impl::post_acc_grad_hooks(p))
      throw std::invalid_argument(owner + ": a parameter already has a post-accumulation hook (another owner's)");
  for (size_t i = 0; i < params.size(); ++i) torch::autograd::impl::set_post_acc_grad_hooks(params[i], make_hook(i));
}

}  // namespace moetrain
