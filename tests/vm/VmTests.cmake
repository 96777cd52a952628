# VM tests: tests that need a real kernel (rdma_rxe, nbd, ...) and run inside the test VM
# (tests/vm/run-in-vm, docs/vm.md).
#
#   mf_add_vm_test(NAME <name> COMMAND <command> [<arg>...]
#                  [TIMEOUT <seconds>] [COST <seconds>] [WORKING_DIRECTORY <dir>]
#                  [LABELS <label>...])
#
# registers a test from any folder. <command> is a target name (its built file is used),
# an absolute path, or a path relative to the calling folder's source directory. Inside
# the guest it runs with WORKING_DIRECTORY (default: the calling folder's binary directory)
# as its current folder, with the environment described in docs/vm.md, and is killed after
# TIMEOUT seconds (default MF_VM_TEST_TIMEOUT). COST is about how many seconds it takes in
# the guest (default MF_VM_TEST_COST); it only balances the shards below.
#
# At the end of configuration the registered tests are dealt into MF_VM_SHARDS shards of
# about equal COST, each written to its own manifest, and
#   vm_suite_<k>  (FIXTURES_SETUP mf_vm_<k>) boots a VM of its own and runs shard k's
#                 manifest; the shards' VMs run side by side (one vCPU each on 2 cores);
#   <name>        (FIXTURES_REQUIRED mf_vm_<k>) prints that test's guest log and exits
#                 with its guest exit status.
# All carry the label `vm`. If a shard's VM does not boot, every VM test of it fails.
# Tests that boot VMs of their own take RESOURCE_LOCK ${MF_VM_LOCKS}: every shard's lock.
#
# Include this file before the first folder that calls mf_add_vm_test (the top-level
# CMakeLists.txt does); including it again is harmless.

include_guard(GLOBAL)

set(MF_VM_BOOT_TIMEOUT 240 CACHE STRING "Seconds the test VM may take to boot and set up")
set(MF_VM_TEST_TIMEOUT 120 CACHE STRING "Default time limit (seconds) of one VM test in the guest")
set(MF_VM_TEST_COST 30 CACHE STRING "Default expected seconds of one VM test in the guest (shard balance)")
# A TCG guest keeps about one host core busy: two shards wherever there are two cores
# (on a 2-core host, `ctest -j 2` then runs nothing else beside them: PROCESSORS below).
cmake_host_system_information(RESULT _mf_cores QUERY NUMBER_OF_LOGICAL_CORES)
if(_mf_cores LESS 2)
  set(_mf_shards 1)
else()
  set(_mf_shards 2)
endif()
set(MF_VM_SHARDS ${_mf_shards} CACHE STRING "How many VMs run the VM tests side by side")
if(NOT MF_VM_SHARDS MATCHES "^[1-9][0-9]*$")
  message(FATAL_ERROR "MF_VM_SHARDS must be a positive number, not '${MF_VM_SHARDS}'")
endif()
set(MF_VM_LOCKS)
foreach(_mf_k RANGE 1 ${MF_VM_SHARDS})
  list(APPEND MF_VM_LOCKS mf_vm_${_mf_k})
endforeach()

function(mf_add_vm_test)
  cmake_parse_arguments(PARSE_ARGV 0 V "" "NAME;TIMEOUT;COST;WORKING_DIRECTORY" "COMMAND;LABELS")
  if(V_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "mf_add_vm_test: unexpected arguments: ${V_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT V_NAME OR NOT V_COMMAND)
    message(FATAL_ERROR "mf_add_vm_test: NAME and COMMAND are required")
  endif()
  if(NOT V_NAME MATCHES "^[A-Za-z0-9_.+-]+$")
    message(FATAL_ERROR "mf_add_vm_test: name '${V_NAME}' must be made of [A-Za-z0-9_.+-]")
  endif()
  get_property(names GLOBAL PROPERTY MF_VM_TESTS)
  if(V_NAME IN_LIST names)
    message(FATAL_ERROR "mf_add_vm_test: '${V_NAME}' is registered twice")
  endif()
  foreach(key IN ITEMS TIMEOUT COST)
    if(NOT V_${key})
      set(V_${key} ${MF_VM_TEST_${key}})
    endif()
    if(NOT V_${key} MATCHES "^[1-9][0-9]*$")
      message(FATAL_ERROR "mf_add_vm_test: ${key} of '${V_NAME}' must be a number of seconds")
    endif()
  endforeach()
  if(NOT V_WORKING_DIRECTORY)
    set(V_WORKING_DIRECTORY ${CMAKE_CURRENT_BINARY_DIR})
  endif()
  # A relative path to a file of the calling folder becomes absolute; a target name is
  # resolved at the end of configuration, when every target exists.
  list(GET V_COMMAND 0 cmd0)
  if(NOT IS_ABSOLUTE "${cmd0}" AND EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${cmd0}"
     AND NOT IS_DIRECTORY "${CMAKE_CURRENT_SOURCE_DIR}/${cmd0}")
    list(REMOVE_AT V_COMMAND 0)
    list(INSERT V_COMMAND 0 "${CMAKE_CURRENT_SOURCE_DIR}/${cmd0}")
  endif()
  set_property(GLOBAL APPEND PROPERTY MF_VM_TESTS ${V_NAME})
  set_property(GLOBAL PROPERTY MF_VM_TEST_${V_NAME}_COMMAND "${V_COMMAND}")
  set_property(GLOBAL PROPERTY MF_VM_TEST_${V_NAME}_TIMEOUT ${V_TIMEOUT})
  set_property(GLOBAL PROPERTY MF_VM_TEST_${V_NAME}_COST ${V_COST})
  set_property(GLOBAL PROPERTY MF_VM_TEST_${V_NAME}_WORKDIR ${V_WORKING_DIRECTORY})
  set_property(GLOBAL PROPERTY MF_VM_TEST_${V_NAME}_LABELS "${V_LABELS}")
endfunction()

# _mf_vm_quote(OUT VALUE): VALUE as one single-quoted bash word.
function(_mf_vm_quote out value)
  string(REPLACE "'" "'\\''" value "${value}")
  set(${out} "'${value}'" PARENT_SCOPE)
endfunction()

# _mf_vm_deal(NAMES SHARDS): sets MF_VM_SHARD_<name> to 1..SHARDS for every test, most
# costly first, each to the shard with the least cost so far.
function(_mf_vm_deal names shards)
  set(sorted)
  foreach(name IN LISTS names)
    get_property(cost GLOBAL PROPERTY MF_VM_TEST_${name}_COST)
    set(pos -1)
    set(i 0)
    foreach(other IN LISTS sorted)
      get_property(other_cost GLOBAL PROPERTY MF_VM_TEST_${other}_COST)
      if(pos EQUAL -1 AND cost GREATER other_cost)
        set(pos ${i})
      endif()
      math(EXPR i "${i} + 1")
    endforeach()
    if(pos EQUAL -1)
      list(APPEND sorted ${name})
    else()
      list(INSERT sorted ${pos} ${name})
    endif()
  endforeach()
  foreach(k RANGE 1 ${shards})
    set(load_${k} 0)
  endforeach()
  foreach(name IN LISTS sorted)
    set(best 1)
    foreach(k RANGE 1 ${shards})
      if(load_${k} LESS load_${best})
        set(best ${k})
      endif()
    endforeach()
    get_property(cost GLOBAL PROPERTY MF_VM_TEST_${name}_COST)
    math(EXPR load_${best} "${load_${best}} + ${cost}")
    set_property(GLOBAL PROPERTY MF_VM_SHARD_${name} ${best})
  endforeach()
endfunction()

# Runs once, at the end of the top-level directory: writes the manifests and the tests.
function(_mf_vm_finalize)
  get_property(names GLOBAL PROPERTY MF_VM_TESTS)
  if(NOT names OR (DEFINED MF_TESTS AND NOT MF_TESTS))
    return()
  endif()
  set(vm_dir ${_MF_VM_SOURCE_DIR})
  set(out_dir ${PROJECT_BINARY_DIR}/tests/vm)
  list(LENGTH names count)
  set(shards ${MF_VM_SHARDS})
  if(shards GREATER count)
    set(shards ${count})
  endif()
  _mf_vm_deal("${names}" ${shards})

  foreach(k RANGE 1 ${shards})
    set(content_${k} "# VM tests registered with mf_add_vm_test, shard ${k} of ${shards}; generated by tests/vm/VmTests.cmake.\n")
    set(total_${k} 0)
  endforeach()
  foreach(name IN LISTS names)
    get_property(k GLOBAL PROPERTY MF_VM_SHARD_${name})
    get_property(command GLOBAL PROPERTY MF_VM_TEST_${name}_COMMAND)
    get_property(limit GLOBAL PROPERTY MF_VM_TEST_${name}_TIMEOUT)
    get_property(workdir GLOBAL PROPERTY MF_VM_TEST_${name}_WORKDIR)
    list(GET command 0 cmd0)
    if(TARGET ${cmd0})
      list(REMOVE_AT command 0)
      list(INSERT command 0 "$<TARGET_FILE:${cmd0}>")
    endif()
    set(line "vm_test '${name}' ${limit}")
    _mf_vm_quote(q "${workdir}")
    string(APPEND line " ${q}")
    foreach(arg IN LISTS command)
      _mf_vm_quote(q "${arg}")
      string(APPEND line " ${q}")
    endforeach()
    string(APPEND content_${k} "${line}\n")
    math(EXPR total_${k} "${total_${k}} + ${limit} + 10")
  endforeach()

  foreach(k RANGE 1 ${shards})
    set(manifest ${out_dir}/vm-tests-${k}.manifest)
    set(results ${out_dir}/results-${k})
    file(GENERATE OUTPUT ${manifest} CONTENT "${content_${k}}")
    math(EXPR suite_timeout "${total_${k}} + 30")
    math(EXPR ctest_timeout "${suite_timeout} + ${MF_VM_BOOT_TIMEOUT} + 60")
    add_test(NAME vm_suite_${k}
             COMMAND ${vm_dir}/run-vm-suite ${manifest} ${results}
                     --timeout ${suite_timeout} --boot-timeout ${MF_VM_BOOT_TIMEOUT})
    # PROCESSORS: a guest keeps a host core busy, so `ctest -j` counts it as one test.
    set_tests_properties(vm_suite_${k} PROPERTIES
      FIXTURES_SETUP mf_vm_${k} LABELS vm TIMEOUT ${ctest_timeout} RESOURCE_LOCK mf_vm_${k}
      PROCESSORS 1)
  endforeach()

  foreach(name IN LISTS names)
    get_property(k GLOBAL PROPERTY MF_VM_SHARD_${name})
    get_property(labels GLOBAL PROPERTY MF_VM_TEST_${name}_LABELS)
    list(PREPEND labels vm)
    add_test(NAME ${name} COMMAND ${vm_dir}/vm-test-result ${out_dir}/results-${k} ${name})
    set_tests_properties(${name} PROPERTIES
      FIXTURES_REQUIRED mf_vm_${k} LABELS "${labels}" TIMEOUT 60)
  endforeach()
endfunction()

set(_MF_VM_SOURCE_DIR "${CMAKE_CURRENT_LIST_DIR}" CACHE INTERNAL "tests/vm source folder")
cmake_language(DEFER DIRECTORY ${PROJECT_SOURCE_DIR} CALL _mf_vm_finalize)
