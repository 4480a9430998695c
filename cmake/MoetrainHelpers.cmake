# moetrain_warnings(target): warnings for moetrain's own code only (LibTorch and
# the other dependencies come in as SYSTEM includes). -Werror with MOETRAIN_WERROR.
function(moetrain_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter>
    $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<BOOL:${MOETRAIN_WERROR}>>:-Werror>)
endfunction()

# add_unit_test(name [LABELS l1 l2 ...] [SOURCES extra.cpp ...])
# One GoogleTest executable per tests/<name>.cpp, registered with CTest.
# Discovery runs before the test (PRE_TEST) so it does not slow the build.
function(add_unit_test name)
  cmake_parse_arguments(ARG "" "TIMEOUT" "LABELS;SOURCES" ${ARGN})
  add_executable(${name} ${CMAKE_CURRENT_SOURCE_DIR}/${name}.cpp ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE moetrain_core GTest::gtest GTest::gtest_main)
  target_include_directories(${name} PRIVATE ${PROJECT_BINARY_DIR}/generated)
  moetrain_reuse_pch(${name})
  moetrain_warnings(${name})
  if(NOT ARG_LABELS)
    set(ARG_LABELS unit)
  endif()
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 600)
  endif()
  gtest_discover_tests(${name}
    DISCOVERY_MODE PRE_TEST
    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR}
    PROPERTIES TIMEOUT ${ARG_TIMEOUT})
  # Labels are set by a script that CTest runs after the discovery script (a list value
  # passed through gtest_discover_tests' PROPERTIES loses all but its first element).
  set(labels_script ${CMAKE_CURRENT_BINARY_DIR}/${name}_labels.cmake)
  file(WRITE ${labels_script}
       "if(${name}_TESTS)\n  set_tests_properties(\${${name}_TESTS} PROPERTIES LABELS \"${ARG_LABELS}\")\nendif()\n")
  set_property(DIRECTORY APPEND PROPERTY TEST_INCLUDE_FILES ${labels_script})
endfunction()

# Reuse moetrain_core's precompiled torch header (one .gch, not one per target).
# Compile definitions must match the core's, so test paths live in a generated
# header (test_paths.h), not in -D flags.
function(moetrain_reuse_pch target)
  if(MOETRAIN_PCH)
    target_precompile_headers(${target} REUSE_FROM moetrain_core)
  endif()
endfunction()
