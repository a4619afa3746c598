# moetrain_add_library(<folder> SOURCES ... [DEPS ...] [TORCH]): one library target per top-level folder, named
# moetrain_<folder>. TORCH targets link LibTorch and share one precompiled LibTorch header.
set(MOETRAIN_WARNINGS -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers)

add_library(moetrain_common INTERFACE)
target_include_directories(moetrain_common INTERFACE ${CMAKE_SOURCE_DIR} ${CMAKE_BINARY_DIR}/generated)
target_compile_options(moetrain_common INTERFACE $<$<COMPILE_LANGUAGE:CXX>:${MOETRAIN_WARNINGS}>)
# The MPI C API only (the deprecated C++ bindings would need libmpi_cxx).
target_compile_definitions(moetrain_common INTERFACE OMPI_SKIP_MPICXX=1 MPICH_SKIP_MPICXX=1)
target_link_libraries(moetrain_common INTERFACE fmt::fmt)
# LibTorch's include directory carries its own fmt (v12) headers, which would shadow the fmt library we link
# (Debian's) in targets that include LibTorch. A directory of links to the system fmt headers, searched before
# LibTorch's (-I before -isystem), keeps one fmt version everywhere.
set(_pinned ${CMAKE_BINARY_DIR}/pinned-include)
file(MAKE_DIRECTORY ${_pinned})
foreach(_header fmt/format.h)
  get_filename_component(_dep ${_header} DIRECTORY)
  find_path(_dir_${_dep} ${_header} NO_CACHE REQUIRED)
  file(CREATE_LINK ${_dir_${_dep}}/${_dep} ${_pinned}/${_dep} SYMBOLIC)
endforeach()
target_include_directories(moetrain_common BEFORE INTERFACE ${_pinned})

# The precompiled header: built once in moetrain_pch, reused by every target that links LibTorch.
add_library(moetrain_pch STATIC ${CMAKE_SOURCE_DIR}/cmake/pch.cpp)
target_link_libraries(moetrain_pch PUBLIC moetrain_common moetrain_torch)
target_precompile_headers(moetrain_pch PRIVATE ${CMAKE_SOURCE_DIR}/cmake/pch.h)

function(moetrain_use_torch target)
  target_link_libraries(${target} PUBLIC moetrain_torch)
  target_precompile_headers(${target} REUSE_FROM moetrain_pch)
endfunction()

function(moetrain_add_library folder)
  cmake_parse_arguments(ARG "TORCH" "" "SOURCES;DEPS" ${ARGN})
  set(target moetrain_${folder})
  add_library(${target} STATIC ${ARG_SOURCES})
  target_link_libraries(${target} PUBLIC moetrain_common ${ARG_DEPS})
  if(ARG_TORCH)
    moetrain_use_torch(${target})
  endif()
endfunction()

# `source` of `target` compiled at -O3 with OpenMP (its loops' simd pragmas, and at::parallel_for, which is compiled
# into its caller: with LibTorch's OpenMP backend it splits the work over the intra-op threads only in code compiled
# with OpenMP), linked against LibTorch's own libgomp so that the process has one OpenMP runtime and thread pool. No FP
# traps are assumed, so that selects vectorize. Where LibTorch has no libgomp of its own the loops still vectorize and
# run on the calling thread.
function(moetrain_use_openmp target source)
  if(NOT DEFINED CACHE{MOETRAIN_TORCH_GOMP})
    find_library(MOETRAIN_TORCH_GOMP NAMES libgomp.so.1 HINTS "${MOETRAIN_TORCH_ROOT}/lib" NO_DEFAULT_PATH)
    if(NOT MOETRAIN_TORCH_GOMP)
      message(WARNING "LibTorch's libgomp not found in ${MOETRAIN_TORCH_ROOT}/lib: the fused CPU kernels and GEMMs "
                      "run on one thread")
    endif()
  endif()
  if(MOETRAIN_TORCH_GOMP)
    set(_openmp "-fopenmp")
    target_link_libraries(${target} PUBLIC "${MOETRAIN_TORCH_GOMP}")
  else()
    set(_openmp "-fopenmp-simd")
  endif()
  set_source_files_properties(${source} TARGET_DIRECTORY ${target} PROPERTIES
      COMPILE_OPTIONS "-O3;${_openmp};-fno-trapping-math" SKIP_PRECOMPILE_HEADERS ON)
endfunction()
