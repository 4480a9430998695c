# `moetrain export` (owned by app/cmd_export + io/hf). Both tests link the command
# itself (app/cmd_export.cpp + app/cli.cpp) and call cmd_export directly.
# Pure C++: strict checkpoint loading, output layout, sharding, atomic output.
add_unit_test(test_export_unit SOURCES ${PROJECT_SOURCE_DIR}/app/cmd_export.cpp ${PROJECT_SOURCE_DIR}/app/cli.cpp)
# Round trip through transformers (MOETRAIN_PYTHON + tests/python/hf_logits.py):
# exported directories load with from_pretrained and give moetrain's logits.
add_unit_test(test_export LABELS parity TIMEOUT 900
              SOURCES ${PROJECT_SOURCE_DIR}/app/cmd_export.cpp ${PROJECT_SOURCE_DIR}/app/cli.cpp)
# `moetrain eval` through the binary, and train → checkpoint → export → the same
# validation loss in the trainer, eval --checkpoint, eval --hf and transformers.
add_unit_test(test_eval LABELS parity TIMEOUT 600)
add_dependencies(test_eval moetrain)
