//! What the host offers the server: the CPUs it may run on (shards are
//! pinned to them) and whether io_uring is allowed (glommio needs it).
//!
//! Owns: the probes, asked once at start. Must never: keep state, or
//! touch a socket.

use crate::ServerError;

/// CPUs this process may run on (at least 1).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The ids of the CPUs this process may run on (its affinity mask), so that
/// shards are pinned only to CPUs the scheduler allows (cgroups, taskset).
pub fn allowed_cpu_ids() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for pid 0
    // (this thread) and CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            let ids: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
                .filter(|&i| libc::CPU_ISSET(i, &set))
                .collect();
            if !ids.is_empty() {
                return ids;
            }
        }
    }
    (0..available_cpus()).collect()
}

/// Checks that this process may use io_uring, which glommio needs and
/// otherwise reports by panicking deep in a shard thread. Asks for a ring of
/// 0 entries: a kernel that allows io_uring answers EINVAL (bad size) and
/// creates nothing; one that refuses it answers EPERM
/// (`kernel.io_uring_disabled`, seccomp) or ENOSYS (not built in). No ring
/// is created, so the probe leaves no trace (an earlier version created
/// and closed a real ring, which made the first connections of a new
/// server fail now and then).
pub fn probe_io_uring() -> Result<(), ServerError> {
    // struct io_uring_params is 120 bytes; zeroed is valid input.
    let mut params = [0u32; 30];
    // SAFETY: io_uring_setup reads and may write only `params` (120 bytes,
    // valid for the call); with 0 entries it creates no ring and no fd.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_io_uring_setup,
            0u32,
            params.as_mut_ptr() as *mut libc::c_void,
        )
    };
    if ret >= 0 {
        // Not expected for 0 entries; a ring was made after all: close it.
        // SAFETY: `ret` is a new fd nothing else owns.
        unsafe { libc::close(ret as libc::c_int) };
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) => Ok(()),
        _ => Err(ServerError::IoUringUnavailable(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_uring_probe_passes_where_io_uring_works() {
        // This machine runs every other server test on io_uring.
        probe_io_uring().unwrap();
    }
}
