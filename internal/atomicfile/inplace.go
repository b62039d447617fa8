package atomicfile

import (
	"fmt"
	"os"
	"syscall"
)

// OverwriteInPlace is the fallback for a full disk, when Write cannot
// create its temporary file: it writes data over the start of the existing
// regular file path, within the blocks the file already has (so it needs no
// free space), padded with spaces to the old length (for text formats such
// as JSON or a number, where trailing spaces are harmless), and fsyncs it.
// It is NOT atomic: a crash in the middle can tear the file. It fails if
// data does not fit in the file's allocated blocks.
func OverwriteInPlace(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("overwrite %s: %w", path, err)
	}
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return fmt.Errorf("overwrite %s: %w", path, err)
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFREG {
		return fmt.Errorf("overwrite %s: not a regular file", path)
	}
	if int64(len(data)) > st.Blocks*512 {
		return fmt.Errorf("overwrite %s in place: %d bytes do not fit in its %d allocated bytes: %w", path, len(data), st.Blocks*512, syscall.ENOSPC)
	}
	b := data
	if pad := st.Size - int64(len(data)); pad > 0 {
		b = make([]byte, st.Size)
		copy(b, data)
		for i := len(data); i < len(b); i++ {
			b[i] = ' '
		}
	}
	if _, err := f.WriteAt(b, 0); err != nil {
		return fmt.Errorf("overwrite %s: %w", path, err)
	}
	if err := syscall.Fdatasync(int(f.Fd())); err != nil {
		return fmt.Errorf("overwrite %s: fsync: %w", path, err)
	}
	return nil
}
