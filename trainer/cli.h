// The `moetrain` command line: subcommands, their --help, and the one place errors become an exit code.
#pragma once

namespace moetrain::trainer {

// Runs the command line on every rank (MPI is initialized here when a launcher started the process) and returns
// the process exit code: 0, or non-zero on every rank when any rank failed.
int run_main(int argc, char** argv);

}  // namespace moetrain::trainer
