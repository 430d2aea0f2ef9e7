# Managed by homeclust (mpi step): Open MPI lives off the default paths here.
# Login shells read this file; on this platform /etc/bashrc also reads it for
# other bash shells, including the non-interactive ones mpirun starts over SSH.
case ":${PATH}:" in *":/usr/lib64/openmpi/bin:"*) ;; *) PATH="/usr/lib64/openmpi/bin${PATH:+:$PATH}"; export PATH ;; esac
case ":${LD_LIBRARY_PATH:-}:" in *":/usr/lib64/openmpi/lib:"*) ;; *) LD_LIBRARY_PATH="/usr/lib64/openmpi/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; export LD_LIBRARY_PATH ;; esac
