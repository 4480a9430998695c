# io tests (owned by the io component)
add_unit_test(test_safetensors)
# Cross-check with Python's safetensors (safe_open / save_file) both ways.
add_unit_test(test_safetensors_python LABELS parity)
