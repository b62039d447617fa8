package atomicfile

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
)

// ErrNotRegular says a path the agent reads is a FIFO, device, socket or
// directory instead of a regular file.
var ErrNotRegular = errors.New("not a regular file")

// OpenRegular opens path for reading only if it is a regular file (a link
// to one is fine). The open never blocks: a FIFO planted where a state file
// belongs would otherwise hang the reader, and with it `gwagent status`,
// until someone writes to it. flag may add O_NOFOLLOW, O_RDWR or O_CREATE
// (with perm).
func OpenRegular(path string, flag int, perm os.FileMode) (*os.File, error) {
	if flag&(os.O_WRONLY|os.O_RDWR) == 0 {
		flag |= os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag|syscall.O_NONBLOCK|syscall.O_CLOEXEC, perm)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("%s is %s: %w; remove it (the agent writes this file itself)", path, DescribeMode(st.Mode()), ErrNotRegular)
	}
	// Regular files ignore O_NONBLOCK for reads; clear it all the same so a
	// caller that keeps the descriptor sees ordinary semantics.
	if err := syscall.SetNonblock(int(f.Fd()), false); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// ReadRegular reads path whole if it is a regular file of at most max
// bytes; a FIFO or device is refused at once and a file that is (or grows)
// larger than max is an error, so /dev/zero behind a link cannot exhaust
// memory.
func ReadRegular(path string, max int64) ([]byte, error) {
	f, err := OpenRegular(path, 0, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%s is larger than %d bytes, more than the agent ever writes there; remove it", path, max)
	}
	return b, nil
}

// DescribeMode names a file type for messages ("a FIFO").
func DescribeMode(m os.FileMode) string {
	switch {
	case m&os.ModeNamedPipe != 0:
		return "a FIFO"
	case m&os.ModeDevice != 0:
		return "a device"
	case m&os.ModeSocket != 0:
		return "a socket"
	case m.IsDir():
		return "a directory"
	case m&os.ModeSymlink != 0:
		return "a symbolic link"
	}
	return "not a regular file"
}
