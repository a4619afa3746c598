#include "checkpoints/hdf5_file.h"
#include "cli/cli.h"

int main(int argc, char** argv) {
  moetrain::checkpoints::start_hdf5_without_teardown();  // before MPI_Init (checkpoints/hdf5_file.h)
  return moetrain::cli::run_main(argc, argv);
}
