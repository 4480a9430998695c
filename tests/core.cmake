add_unit_test(test_config)
add_unit_test(test_params)
add_unit_test(test_cli LABELS unit cli)
add_dependencies(test_cli moetrain)
add_unit_test(test_kernels)
add_unit_test(test_kernels_cuda LABELS cuda)
add_unit_test(test_balance)
add_unit_test(test_optim)
# the clipping norm summed during the backward (trainer/grad_norm_tracker.h)
add_unit_test(test_grad_norm_tracker)
# train.param_dtype bf16: fp32 masters in the optimizer (trainer/master_weights.h)
add_unit_test(test_master_weights)
add_unit_test(test_trainer)

# libFuzzer over the safetensors header parser for a fixed budget (clang only).
find_program(MOETRAIN_CLANGXX clang++)
if(MOETRAIN_CLANGXX)
  add_test(NAME fuzz_safetensors_header COMMAND ${PROJECT_SOURCE_DIR}/scripts/fuzz.sh 60)
  set_tests_properties(fuzz_safetensors_header PROPERTIES LABELS "fuzz;slow" TIMEOUT 300
                       ENVIRONMENT "FUZZ_CXX=${MOETRAIN_CLANGXX}")
endif()
add_unit_test(test_ablation)
add_dependencies(test_ablation moetrain)
add_unit_test(test_generate LABELS unit cli)
add_dependencies(test_generate moetrain)
# Data parallel over Gloo (2 local ranks, CPU): needs the gloo headers at build time.
if(MOETRAIN_GLOO_INCLUDE)
  add_unit_test(test_dist)  # label unit (run alone: ctest -R "^Dist")
  add_dependencies(test_dist moetrain)
  # ZeRO-1 (trainer/zero.h): layout, sharded AdamW, 2/4-rank runs, resharded checkpoints.
  add_unit_test(test_zero)  # ctest -R "^Zero"
  add_dependencies(test_zero moetrain)
  # GradReducer: gradient averaging overlapped with the backward (ranks as threads)
  add_unit_test(test_grad_reducer)  # ctest -R "^GradReducer"
endif()
# NCCL data parallelism + ZeRO-1 on 2 GPUs (skips with fewer): ctest -L cuda -R DistCuda
if(MOETRAIN_WITH_NCCL)
  add_unit_test(test_dist_cuda LABELS cuda)
  add_dependencies(test_dist_cuda moetrain)
endif()
# Expert parallelism over Gloo (ranks as threads, and 2/4 local ranks through launch).
if(MOETRAIN_GLOO_INCLUDE)
  add_unit_test(test_ep)  # label unit (run alone: ctest -R "^Ep")
  add_dependencies(test_ep moetrain)
  # The dispatch's device-side regroup permutation and round trip (ctest -R "^EpRegroup|^EpDispatch").
  add_unit_test(test_ep_dispatch)
endif()
# scripts/ncu_stalls.py (the stall samples per SASS instruction of an ncu source page): a small
# page sorted by samples, and a file that is not one rejected with the reason.
add_test(NAME ncu_stalls_script COMMAND ${MOETRAIN_PYTHON} ${PROJECT_SOURCE_DIR}/scripts/ncu_stalls.py
                                        ${PROJECT_SOURCE_DIR}/tests/python/ncu_source_sample.csv --top 2)
set_tests_properties(ncu_stalls_script PROPERTIES LABELS unit
  PASS_REGULAR_EXPRESSION "100 samples\n[^\n]*60.0 % +184832 @!P0  BRA[^\n]*long_sb 58[^\n]*\n[^\n]*30.0 %[^\n]*DEPBAR")
add_test(NAME ncu_stalls_script_rejects COMMAND ${MOETRAIN_PYTHON} ${PROJECT_SOURCE_DIR}/scripts/ncu_stalls.py
                                                ${PROJECT_SOURCE_DIR}/tests/python/hf_logits.py)
set_tests_properties(ncu_stalls_script_rejects PROPERTIES LABELS unit
  PASS_REGULAR_EXPRESSION "hf_logits.py: no 'Address'/'Source' header: not an ncu source page")
