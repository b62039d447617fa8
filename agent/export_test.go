package agent

import "github.com/fsnotify/fsnotify"

// WithoutInotify makes the agent's directory watchers fail to start, as they
// do when the kernel's per-user inotify instance limit is used up.
func WithoutInotify(opts *Options, err error) {
	opts.newWatcher = func() (*fsnotify.Watcher, error) { return nil, err }
	opts.newInotify = func() (int, error) { return -1, err }
}
