package diskspace

import "github.com/gwagent/gwagent/internal/condition"

// Note raises condition.DiskFull on s if err says the file system of dir is
// full, and reports whether it did. The first directory found full names
// the condition; later ones do not replace its reason.
func Note(s condition.Sink, dir string, err error) bool {
	if !NoSpace(err) {
		return false
	}
	if !s.Has(condition.DiskFull) {
		s.Raise(condition.DiskFull, Reason(dir))
	}
	return true
}

// ClearWhenRoom clears condition.DiskFull once the file system of every dir
// has at least bytes and inodes free, and reports whether it did.
func ClearWhenRoom(s condition.Sink, bytes, inodes uint64, dirs ...string) bool {
	for _, dir := range dirs {
		if ok, err := HasRoom(dir, bytes, inodes); !ok || err != nil {
			return false
		}
	}
	s.Clear(condition.DiskFull)
	return true
}
