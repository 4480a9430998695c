# Hugging Face DeepseekV3 import tests (owned by io/hf)
add_unit_test(test_hf_loader)
# Builds random transformers models with tests/python/make_hf_reference.py
# (MOETRAIN_PYTHON) and compares moetrain's logits with theirs.
add_unit_test(test_hf_parity LABELS parity TIMEOUT 900)
add_dependencies(test_hf_parity moetrain)  # HfEval runs the moetrain executable
