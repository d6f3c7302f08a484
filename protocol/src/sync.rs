//! Locks that outlive a panic: a thread that panicked while holding one
//! leaves data that every holder keeps consistent between statements (the
//! services hold locks only for a few plain updates, never across an
//! await), so the next holder takes it as it is instead of panicking too.
//! The one place the poison idiom is written.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `mutex`, poisoned or not.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-locks `lock`, poisoned or not.
pub fn read<T: ?Sized>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-locks `lock`, poisoned or not.
pub fn write<T: ?Sized>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_poisoned_by_a_panic_is_still_taken() {
        let mutex = Mutex::new(1);
        let poisoned = std::panic::catch_unwind(|| {
            let _held = mutex.lock().expect("not poisoned yet");
            panic!("while holding it");
        });
        assert!(poisoned.is_err() && mutex.is_poisoned());
        *lock(&mutex) += 1;
        assert_eq!(*lock(&mutex), 2);
        let rw = RwLock::new(1);
        let _ = std::panic::catch_unwind(|| {
            let _held = rw.write().expect("not poisoned yet");
            panic!("while holding it");
        });
        *write(&rw) += 1;
        assert_eq!(*read(&rw), 2);
    }
}
