# MPI tests (CTest label mpi): the dist test binary's Mpi* and MpiTrain* tests under mpirun with 2
# and 4 ranks on one machine (--oversubscribe: CI has 2 cores), `mpirun -np 2 dsv3 train` end to
# end, and the killed-rank test. Root in CI: the
# OMPI_ALLOW_RUN_AS_ROOT variables go into each test's environment.
if(DSV3_HAVE_MPI AND DSV3_BUILD_TESTS AND TARGET dsv3_dist_tests)
  find_program(DSV3_MPIRUN NAMES mpirun mpiexec HINTS ${MPIEXEC_EXECUTABLE})
  if(DSV3_MPIRUN)
    set(dsv3_mpi_env "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMP_NUM_THREADS=1")
    foreach(np 2 4)
      add_test(NAME dist_mpi_np${np}
               COMMAND ${DSV3_MPIRUN} --oversubscribe -np ${np} $<TARGET_FILE:dsv3_dist_tests> --gtest_filter=Mpi.*:MpiTrain.*)
      set_tests_properties(dist_mpi_np${np} PROPERTIES LABELS "mpi;dist" TIMEOUT 120 PROCESSORS 2
                           ENVIRONMENT "${dsv3_mpi_env}")
    endforeach()
    # `mpirun -np 2 dsv3 train` end to end (EP, ZeRO-1, --ranks-per-node, resume, mismatched ranks).
    add_test(NAME dist_mpi_train_cli
             COMMAND bash ${CMAKE_SOURCE_DIR}/tests/dist/mpi_train_cli_test.sh $<TARGET_FILE:dsv3> 2)
    set_tests_properties(dist_mpi_train_cli PROPERTIES LABELS "mpi;dist" TIMEOUT 300 PROCESSORS 2
                         ENVIRONMENT "${dsv3_mpi_env}")
    add_test(NAME dist_mpi_kill
             COMMAND bash ${CMAKE_SOURCE_DIR}/tests/dist/mpi_kill_test.sh $<TARGET_FILE:dsv3_dist_tests> 2)
    set_tests_properties(dist_mpi_kill PROPERTIES LABELS "mpi;dist" TIMEOUT 90 PROCESSORS 2
                         ENVIRONMENT "${dsv3_mpi_env}")
  endif()
endif()

# The MPI-free GPU launcher's own behaviour (no GPU needed: the command is a stand-in).
if(DSV3_BUILD_TESTS AND TARGET dsv3)
  add_test(NAME dist_launch_gpus
           COMMAND bash ${CMAKE_SOURCE_DIR}/tests/dist/launch_gpus_test.sh ${CMAKE_SOURCE_DIR}/scripts/launch_gpus.sh
                   $<TARGET_FILE:dsv3>)
  set_tests_properties(dist_launch_gpus PROPERTIES LABELS "dist" TIMEOUT 60)
endif()

# NCCL on one GPU, and on two through the MPI-free launcher (GPU machines only: label gpu).
if(DSV3_HAVE_NCCL AND DSV3_BUILD_TESTS AND TARGET dsv3_dist_tests)
  add_test(NAME dist_nccl_one_rank COMMAND $<TARGET_FILE:dsv3_dist_tests> --gtest_filter=Nccl.*)
  add_test(NAME dist_nccl_two_ranks
           COMMAND bash ${CMAKE_SOURCE_DIR}/scripts/launch_gpus.sh -n 2 -- $<TARGET_FILE:dsv3_dist_tests> --gtest_filter=Nccl.*)
  set_tests_properties(dist_nccl_one_rank dist_nccl_two_ranks PROPERTIES LABELS "gpu" TIMEOUT 180 RESOURCE_LOCK gpu)
endif()
