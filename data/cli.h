// The `moetrain data` commands: tokenizer-train, build, inspect and synth. trainer/cli.cpp registers them on its
// CLI::App and runs the one selected; each prints a short report on stdout and throws std::runtime_error (naming
// the file and what is wrong) on bad input.
#pragma once

#include <memory>

namespace CLI {
class App;
}

namespace moetrain::data {

struct DataOptions;  // the parsed options of every data command (data/cli.cpp)

struct DataCommands {
  CLI::App* data = nullptr;
  CLI::App* tokenizer_train = nullptr;
  CLI::App* build = nullptr;
  CLI::App* inspect = nullptr;
  CLI::App* synth = nullptr;
  std::shared_ptr<DataOptions> options;  // bound to the commands' options: shared so the struct can be copied

  bool selected() const;  // a data command was given on the command line
};

// Adds `data` and its subcommands to `app`.
DataCommands add_data_commands(CLI::App& app);

// Runs the selected data command; false when none was selected.
bool run_data_command(const DataCommands& commands);

}  // namespace moetrain::data
