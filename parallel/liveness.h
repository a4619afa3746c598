// Which rank stopped: when a collective times out, the rank that noticed asks every other rank whether it is alive
// (a ping on a private duplicate of the world) and names those that do not answer within a grace period — a
// stopped (SIGSTOP, a debugger, a swapped-out node) or hung rank — instead of reporting only about itself. Every
// rank answers pings from wherever it waits (the communicators' wait loops, the end-of-command agreement), so a
// rank that is merely waiting elsewhere for the same lost peer is counted alive.
// Without MPI (one process) all of this is a no-op.
#pragma once

#include <string>
#include <vector>

namespace moetrain::parallel::liveness {

// Collective over the world, once, right after MPI_Init; frees nothing (the duplicate lives until MPI_Finalize).
void start();
// Answers pending pings from other ranks. Cheap (one probe when none is pending), safe from any thread.
void answer();
// Pings every other world rank, answering others' pings meanwhile, and returns the world ranks that did not
// answer within grace_s, in order. Also remembered for silent_ranks_seen().
std::vector<int> silent_ranks(double grace_s);
// The result of the last silent_ranks() on this rank (empty when none ran or every rank answered).
std::vector<int> silent_ranks_seen();
// "; world rank 3 did not answer within 5 s (stopped or hung)" or "; every other rank answered (...)": the
// sentence a timeout error appends. Runs silent_ranks(grace_s).
std::string explain_timeout(double grace_s);

}  // namespace moetrain::parallel::liveness
