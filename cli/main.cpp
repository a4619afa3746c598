#include "cli/cli.h"

int main(int argc, char** argv) { return moetrain::cli::run_main(argc, argv); }
