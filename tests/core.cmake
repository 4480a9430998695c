add_unit_test(test_config)
add_unit_test(test_params)
add_unit_test(test_cli LABELS unit cli)
add_dependencies(test_cli moetrain)
