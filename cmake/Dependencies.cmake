# Third-party dependencies. LibTorch comes from the PyPI torch wheel (scripts/setup.sh); CMAKE_PREFIX_PATH points at
# torch.utils.cmake_prefix_path. Everything else comes from Debian packages.
find_package(PkgConfig REQUIRED)

# --- LibTorch: a CUDA build where a toolkit is found, a CPU-only build elsewhere --------------------------------
include(CheckLanguage)
set(MOETRAIN_WITH_CUDA 0)
if(MOETRAIN_CUDA)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(MOETRAIN_WITH_CUDA 1)
  endif()
endif()

find_path(MOETRAIN_TORCH_ROOT include/torch/csrc/api/include/torch/torch.h
          HINTS ${CMAKE_PREFIX_PATH} PATH_SUFFIXES ../.. NO_DEFAULT_PATH)
if(NOT MOETRAIN_TORCH_ROOT)
  message(FATAL_ERROR "LibTorch not found: pass -DCMAKE_PREFIX_PATH=$(python -c 'import torch;"
                      "print(torch.utils.cmake_prefix_path)') or run scripts/setup.sh")
endif()
get_filename_component(MOETRAIN_TORCH_ROOT "${MOETRAIN_TORCH_ROOT}" REALPATH)

add_library(moetrain_torch INTERFACE)
if(MOETRAIN_WITH_CUDA)
  enable_language(CUDA)
  # Compile CUDA for the GPU machines this project runs on (H200: sm_90a) unless told otherwise; the torch config
  # would otherwise generate code for eleven architectures.
  if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    set(ENV{TORCH_CUDA_ARCH_LIST} "9.0a")
  endif()
  if(NOT CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "52")
    set(CMAKE_CUDA_ARCHITECTURES 90a)
  endif()
  find_package(Torch REQUIRED)
  # The CUDA parts of LibTorch register themselves from static initializers: link libtorch_cuda even though no
  # symbol of ours names it (REFERENCE.md: build facts).
  target_link_libraries(moetrain_torch INTERFACE "-Wl,--no-as-needed" ${TORCH_LIBRARIES} "-Wl,--as-needed")
  # One NCCL in the process: the one the torch wheel loads (nvidia-nccl-cu13), never the toolkit's copy.
  get_filename_component(_site "${MOETRAIN_TORCH_ROOT}/.." REALPATH)
  find_path(MOETRAIN_NCCL_INCLUDE nccl.h HINTS "${_site}/nvidia/nccl/include" NO_DEFAULT_PATH)
  find_file(MOETRAIN_NCCL_LIBRARY NAMES libnccl.so.2 libnccl.so HINTS "${_site}/nvidia/nccl/lib" NO_DEFAULT_PATH)
  if(NOT MOETRAIN_NCCL_INCLUDE OR NOT MOETRAIN_NCCL_LIBRARY)
    message(FATAL_ERROR "NCCL of the torch wheel not found under ${_site}/nvidia/nccl (pip package nvidia-nccl-cu13)")
  endif()
  add_library(moetrain_nccl INTERFACE)
  target_include_directories(moetrain_nccl SYSTEM INTERFACE ${MOETRAIN_NCCL_INCLUDE})
  target_link_libraries(moetrain_nccl INTERFACE ${MOETRAIN_NCCL_LIBRARY} CUDA::cudart)
  find_package(CUDAToolkit REQUIRED)
  set(MOETRAIN_BUILD_KIND "CUDA (CUDA ${CUDAToolkit_VERSION}, NCCL from ${MOETRAIN_NCCL_LIBRARY})")
else()
  # A CUDA wheel's TorchConfig.cmake insists on a CUDA toolkit; without one link the CPU libraries directly.
  foreach(_lib torch_cpu c10 torch)
    find_library(MOETRAIN_TORCH_${_lib} ${_lib} HINTS "${MOETRAIN_TORCH_ROOT}/lib" NO_DEFAULT_PATH REQUIRED)
  endforeach()
  target_include_directories(moetrain_torch SYSTEM INTERFACE
      "${MOETRAIN_TORCH_ROOT}/include" "${MOETRAIN_TORCH_ROOT}/include/torch/csrc/api/include")
  target_compile_definitions(moetrain_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=1)
  target_link_libraries(moetrain_torch INTERFACE
      ${MOETRAIN_TORCH_torch} ${MOETRAIN_TORCH_torch_cpu} ${MOETRAIN_TORCH_c10})
  if(MOETRAIN_CUDA)
    set(MOETRAIN_BUILD_KIND "CPU-only (no CUDA toolkit found)")
  else()
    set(MOETRAIN_BUILD_KIND "CPU-only (MOETRAIN_CUDA=OFF)")
  endif()
endif()
# The wheel's libtorch.so and libtorch_cpu.so export a private copy of std::filesystem (remove_all crashes when
# called through it). Loading libstdc++ first makes every std:: symbol of ours bind to the system library.
target_link_options(moetrain_torch INTERFACE "LINKER:--push-state,--no-as-needed" "-lstdc++" "LINKER:--pop-state")
file(READ "${MOETRAIN_TORCH_ROOT}/include/torch/headeronly/version.h" _tv)
set(MOETRAIN_TORCH_VERSION "")
foreach(_part MAJOR MINOR PATCH)
  string(REGEX MATCH "TORCH_VERSION_${_part} ([0-9]+)" _m "${_tv}")
  list(APPEND MOETRAIN_TORCH_VERSION ${CMAKE_MATCH_1})
endforeach()
list(JOIN MOETRAIN_TORCH_VERSION "." MOETRAIN_TORCH_VERSION)
message(STATUS "LibTorch ${MOETRAIN_TORCH_VERSION} from ${MOETRAIN_TORCH_ROOT}")

# --- MPI, parallel HDF5 ------------------------------------------------------------------------------------------
find_package(MPI REQUIRED COMPONENTS C)
pkg_check_modules(HDF5 REQUIRED IMPORTED_TARGET hdf5-openmpi)
set(MOETRAIN_HDF5_PKG_VERSION ${HDF5_VERSION})

# --- small libraries -----------------------------------------------------------------------------------------------
find_package(yaml-cpp REQUIRED)
find_package(CLI11 REQUIRED)
find_package(nlohmann_json REQUIRED)
find_package(fmt REQUIRED)
pkg_check_modules(XXHASH REQUIRED IMPORTED_TARGET libxxhash)
pkg_check_modules(SENTENCEPIECE REQUIRED IMPORTED_TARGET sentencepiece)
set(MOETRAIN_YAML_CPP_VERSION ${yaml-cpp_VERSION})
if(NOT MOETRAIN_YAML_CPP_VERSION)
  set(MOETRAIN_YAML_CPP_VERSION "unknown")
endif()
