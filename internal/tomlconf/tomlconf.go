// Package tomlconf reads a configuration file the way gwagent's commands
// and agent do: only a regular file of bounded size, decoded strictly (an
// unknown key is an error), with errors that name the file, line and column
// and say what to write instead. A leaf: no logging, no package state.
package tomlconf

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"slices"
	"strings"
	"syscall"

	"github.com/pelletier/go-toml/v2"
	"github.com/pelletier/go-toml/v2/unstable"

	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/internal/duration"
)

// MaxBytes bounds a config file; gwagent's commented example is ~10 KiB.
const MaxBytes = 1 << 20

// Read reads path only if it is a regular file (a link to one is fine) of
// at most MaxBytes. A FIFO would block the reader, /dev/zero would never
// end. The open's error is returned as it is (fs.ErrNotExist,
// fs.ErrPermission), for the caller to say what to do.
func Read(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is %s, not a regular file; --config must name the TOML file", path, atomicfile.DescribeMode(st.Mode()))
	}
	if st.Size() > MaxBytes {
		return nil, fmt.Errorf("%s has %d bytes; a config file may have at most %d", path, st.Size(), MaxBytes)
	}
	raw, err := io.ReadAll(io.LimitReader(f, MaxBytes+1))
	if err != nil {
		return nil, err
	}
	if len(raw) > MaxBytes {
		return nil, fmt.Errorf("%s grew beyond %d bytes while being read", path, MaxBytes)
	}
	return raw, nil
}

// Decode decodes raw, read from path, into v (a pointer to a struct with
// toml tags), refusing unknown keys. example names the commented example
// config an unknown key's error points at.
func Decode(path string, raw []byte, v any, example string) error {
	dec := toml.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil {
		return nil
	}
	var sm *toml.StrictMissingError
	if errors.As(err, &sm) {
		var lines []string
		for _, e := range sm.Errors {
			row, _ := e.Position()
			lines = append(lines, fmt.Sprintf("%s:%d: unknown key %q (check its spelling and section; see %s)", path, row, strings.Join(e.Key(), "."), example))
		}
		return errors.New(strings.Join(lines, "; "))
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		row, col := de.Position()
		return fmt.Errorf("%s:%d:%d: %s", path, row, col, strings.TrimPrefix(de.Error(), "toml: "))
	}
	if key, row, col, ok := misplacedDuration(raw, durationKeys(reflect.TypeOf(v).Elem())); ok {
		return fmt.Errorf("%s:%d:%d: %s must be a duration in quotes, e.g. %s = \"90s\" (units: ms, s, m, h)", path, row, col, key, key[strings.LastIndex(key, ".")+1:])
	}
	return fmt.Errorf("%s: %w", path, err)
}

// durationKeys are the dotted keys of t's duration.Duration fields.
func durationKeys(t reflect.Type) map[string]bool {
	out := map[string]bool{}
	var walk func(t reflect.Type, prefix string)
	walk = func(t reflect.Type, prefix string) {
		for i := range t.NumField() {
			f := t.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
			if name == "" {
				continue
			}
			switch {
			case f.Type == reflect.TypeFor[duration.Duration](), f.Type == reflect.TypeFor[*duration.Duration]():
				out[prefix+name] = true
			case f.Type.Kind() == reflect.Struct:
				walk(f.Type, prefix+name+".")
			}
		}
	}
	walk(t, "")
	return out
}

// misplacedDuration finds a duration key whose value is not a string (the
// decoder's error for `interval = 5` carries no position).
func misplacedDuration(raw []byte, keys map[string]bool) (key string, row, col int, ok bool) {
	var p unstable.Parser
	p.Reset(raw)
	var table []string
	parts := func(it unstable.Iterator) []string {
		var out []string
		for it.Next() {
			out = append(out, string(it.Node().Data))
		}
		return out
	}
	for p.NextExpression() {
		e := p.Expression()
		switch e.Kind {
		case unstable.Table:
			table = parts(e.Key())
		case unstable.KeyValue:
			k := strings.Join(append(slices.Clone(table), parts(e.Key())...), ".")
			if v := e.Value(); keys[k] && v.Kind != unstable.String {
				sh := p.Shape(v.Raw)
				return k, sh.Start.Line, sh.Start.Column, true
			}
		}
	}
	return "", 0, 0, false
}
