#include "trainer/cli.h"

int main(int argc, char** argv) { return moetrain::trainer::run_main(argc, argv); }
