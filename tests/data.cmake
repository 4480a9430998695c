# data tests (owned by the data component)
add_unit_test(test_tokenizer)
add_unit_test(test_data)
# End-to-end `data prepare` on tiny temp corpora; links the command itself.
add_unit_test(test_data_prepare SOURCES ${PROJECT_SOURCE_DIR}/app/cmd_data.cpp ${PROJECT_SOURCE_DIR}/app/cli.cpp)
add_unit_test(test_data_slow LABELS slow TIMEOUT 900)
