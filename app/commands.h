// defines: one entry point per `moetrain <command>`; argv starts after the
// command word(s). Each returns the process exit code.
#pragma once

namespace moetrain {

int cmd_config_show(int argc, char** argv);
int cmd_params(int argc, char** argv);
int cmd_eval(int argc, char** argv);
int cmd_train(int argc, char** argv);
int cmd_data(int argc, char** argv);
int cmd_ablate(int argc, char** argv);
int cmd_export(int argc, char** argv);
int cmd_bench(int argc, char** argv);
int cmd_generate(int argc, char** argv);
int cmd_launch(int argc, char** argv);

}  // namespace moetrain
