// The `moetrain` command line: subcommands, their --help, and the one place errors become an exit code.
#pragma once

#include <string>
#include <vector>

namespace CLI {
class App;
class Option;
}  // namespace CLI

namespace moetrain::cli {

// The `--set section.key=value` option of every program that reads a config (repeatable, one override each).
CLI::Option* add_set_option(CLI::App* app, std::vector<std::string>& overrides);

// Runs the command line on every rank (MPI is initialized here when a launcher started the process) and returns
// the process exit code: 0, or non-zero on every rank when any rank failed.
int run_main(int argc, char** argv);

}  // namespace moetrain::cli
