package telemetry

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"golang.org/x/sys/unix"
)

// rejected/ holds the spool files the agent refused, for a person to look
// at. It is bounded: an application that rewrites the same broken file
// every ten seconds would otherwise leave 8,640 files a day there until the
// disk is full. The newest RejectedKeep files are kept, as long as they
// take no more than RejectedKeepBytes together (the newest one is always
// kept, whatever its size: it was in the spool already); older ones are
// deleted, counted (Stats.SpoolRejectedRemoved) and logged. The retirer
// goroutine does it after each refusal and at start, off the spool loop,
// since unlinking is slow on some disks and a rejected/ left by an older
// version may hold many files.
const (
	RejectedKeep      = 100
	RejectedKeepBytes = 16 << 20
)

// rejectedDepth bounds how deep the retirer goes into a refused directory
// (a directory named *.json is refused too) to delete it.
const rejectedDepth = 8

// pruneSoon asks the retirer to bring rejected/ to its bounds.
func (p *Pipeline) pruneSoon() {
	select {
	case p.prune <- struct{}{}:
	default:
	}
}

// pruneRejected brings dir/rejected to its bounds, if it is the agent's
// own directory, and says what it removed.
func (p *Pipeline) pruneRejected(dir string) {
	removed, kept, err := pruneRejectedDir(dir, RejectedKeep, RejectedKeepBytes)
	if removed > 0 {
		p.rejectedRemoved.Add(int64(removed))
		p.log.Info("rejected/ keeps the newest refused spool files; removed the oldest",
			"dir", filepath.Join(dir, spoolRejectedDir), "removed", removed, "kept", kept,
			"keep_files", RejectedKeep, "keep_bytes", RejectedKeepBytes)
		p.o.Changed(true) // as often as refusals, which are urgent too
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		p.log.Warn("cannot bound rejected/", "dir", filepath.Join(dir, spoolRejectedDir), "err", err)
	}
}

type rejectedEntry struct {
	name  string
	ctime int64 // when it was moved in (a rename sets it)
	bytes int64 // space it takes
	dir   bool
}

// pruneRejectedDir deletes the oldest entries of dir/rejected beyond keep
// entries or keepBytes bytes, never the newest one. It returns how many it
// removed and how many are left; an entry it cannot remove counts as kept.
func pruneRejectedDir(dir string, keep int, keepBytes int64) (removed, kept int, err error) {
	rdir := filepath.Join(dir, spoolRejectedDir)
	fd, err := unix.Open(rdir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, 0, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || int(st.Uid) != os.Geteuid() {
		unix.Close(fd)
		return 0, 0, err // not ours: nothing of ours is in it either
	}
	// Read the names through a descriptor of its own; fd stays for the
	// *at calls.
	rfd, err := unix.Dup(fd)
	if err != nil {
		unix.Close(fd)
		return 0, 0, err
	}
	defer unix.Close(fd)
	d := os.NewFile(uintptr(rfd), rdir)
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return 0, 0, err
	}
	if len(names) <= keep {
		// Cheap case first: the byte bound needs a stat per entry, so
		// only look when the count alone does not settle it.
		total := int64(0)
		for _, n := range names {
			var est unix.Stat_t
			if unix.Fstatat(fd, n, &est, unix.AT_SYMLINK_NOFOLLOW) == nil {
				total += est.Blocks * 512
			}
		}
		if total <= keepBytes {
			return 0, len(names), nil
		}
	}
	ents := make([]rejectedEntry, 0, len(names))
	for _, n := range names {
		var est unix.Stat_t
		if unix.Fstatat(fd, n, &est, unix.AT_SYMLINK_NOFOLLOW) != nil {
			continue // gone meanwhile
		}
		ents = append(ents, rejectedEntry{name: n, ctime: est.Ctim.Nano(), bytes: est.Blocks * 512, dir: est.Mode&unix.S_IFMT == unix.S_IFDIR})
	}
	// Newest first; equal times by name, so the order is stable.
	sort.Slice(ents, func(i, j int) bool {
		if ents[i].ctime != ents[j].ctime {
			return ents[i].ctime > ents[j].ctime
		}
		return ents[i].name > ents[j].name
	})
	var total int64
	for i, e := range ents {
		if i == 0 || i < keep && total+e.bytes <= keepBytes {
			total += e.bytes
			kept++
			continue
		}
		if removeAt(fd, e.name, e.dir, rejectedDepth) == nil {
			removed++
		} else {
			kept++
		}
	}
	return removed, kept, nil
}

// removeAt removes name in the directory dfd: a file, or a directory with
// what it holds down to depth levels, always through descriptors and
// never following a symbolic link (an application made what is in a
// refused directory).
func removeAt(dfd int, name string, isDir bool, depth int) error {
	if !isDir {
		return unix.Unlinkat(dfd, name, 0)
	}
	if err := unix.Unlinkat(dfd, name, unix.AT_REMOVEDIR); err == nil || depth == 0 {
		return err
	}
	sub, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	rd, err := unix.Dup(sub)
	if err != nil {
		unix.Close(sub)
		return err
	}
	d := os.NewFile(uintptr(rd), name)
	// In batches: an application may have put any number of entries in a
	// directory of its own, and the agent's memory is bounded.
	for {
		names, err := d.Readdirnames(256)
		for _, n := range names {
			var st unix.Stat_t
			if unix.Fstatat(sub, n, &st, unix.AT_SYMLINK_NOFOLLOW) == nil {
				removeAt(sub, n, st.Mode&unix.S_IFMT == unix.S_IFDIR, depth-1)
			}
		}
		if err != nil || len(names) == 0 {
			break
		}
	}
	d.Close()
	unix.Close(sub)
	return unix.Unlinkat(dfd, name, unix.AT_REMOVEDIR)
}

// openOwnDir opens the directory p, making it with mode if it is absent,
// without following a link, and checks that the agent owns it: a member
// of the spool group may have made it first (as a link, or as its own
// directory), and then the agent must not put files there.
func openOwnDir(p string, mode os.FileMode) (int, unix.Stat_t, error) {
	var st unix.Stat_t
	if err := os.Mkdir(p, mode); err != nil && !errors.Is(err, os.ErrExist) {
		return -1, st, err
	}
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, st, fmt.Errorf("%s is not a directory the agent may use (%w); remove it, the agent makes its own", p, err)
	}
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, st, err
	}
	if int(st.Uid) != os.Geteuid() {
		unix.Close(fd)
		return -1, st, fmt.Errorf("%s is owned by uid %d, not by the agent; remove it, the agent makes its own", p, st.Uid)
	}
	return fd, st, nil
}
