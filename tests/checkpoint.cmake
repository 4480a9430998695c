# Checkpoint / resume / fault handling (trainer/checkpoint.h): tiny CPU runs.
add_unit_test(test_checkpoint)
