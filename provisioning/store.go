package provisioning

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/gwagent/gwagent/internal/atomicfile"
)

// Store keeps the device's operational identity in the state directory, in
// generations, so a renewal can prepare the next identity beside the current
// one and switch with one atomic rename:
//
//	STATE/identity/gen-000001/chain.pem      leaf first, PEM
//	STATE/identity/gen-000001/identity.json  key URI, hub, device id, ...
//	STATE/identity/current                   "gen-000001": the committed one
//	STATE/identity/next                      a staged generation (renewal), optional
//
// A generation directory is complete (every file fsynced) before any pointer
// names it; pointers are replaced atomically. A crash at any moment therefore
// leaves the old identity or the new one, never a mix. Generations no pointer
// names are leftovers of an interrupted write and are removed by Prune.
type Store struct {
	dir string
	// crashAt, when set (tests only), is called at each named step so a test
	// can kill the process there.
	crashAt func(step string)
}

// Identity is one generation of the operational identity.
type Identity struct {
	// KeyURI is the key the certificate belongs to. It may carry a
	// pin-value, so the file is 0600 and KeyURI is never logged.
	KeyURI         string    `json:"keyUri"`
	RegistrationID string    `json:"registrationId"`
	DeviceID       string    `json:"deviceId"`
	AssignedHub    string    `json:"assignedHub"`
	Serial         string    `json:"serial"`
	NotBefore      time.Time `json:"notBefore"`
	NotAfter       time.Time `json:"notAfter"`
	IssuedAt       time.Time `json:"issuedAt"`
	// Via says how the certificate was obtained: "dps", "hub" or "factory".
	Via string `json:"via"`

	// Filled in on load, not stored in identity.json.
	Generation string              `json:"-"`
	ChainPath  string              `json:"-"`
	Chain      []*x509.Certificate `json:"-"`
}

// Leaf returns the identity's own certificate.
func (id *Identity) Leaf() *x509.Certificate { return id.Chain[0] }

// ErrNotProvisioned: the state directory holds no committed identity.
var ErrNotProvisioned = errors.New("device not provisioned")

const (
	pointerCurrent = "current"
	pointerNext    = "next"
	chainFile      = "chain.pem"
	identityFile   = "identity.json"
)

// OpenStore opens (creating, 0700) the identity store under stateDir.
func OpenStore(stateDir string) (*Store, error) {
	dir := filepath.Join(stateDir, "identity")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
			return nil, fmt.Errorf("identity store: %w", err)
		}
		return nil, fmt.Errorf("identity store: %w; check that the state directory exists and is writable by this user", err)
	}
	return &Store{dir: dir}, nil
}

// Dir is the store's directory.
func (s *Store) Dir() string { return s.dir }

func (s *Store) step(name string) {
	if s.crashAt != nil {
		s.crashAt(name)
	}
}

// Current loads the committed identity, or returns ErrNotProvisioned.
func (s *Store) Current() (*Identity, error) { return s.load(pointerCurrent) }

// Next loads the staged identity, or returns ErrNotProvisioned if none.
func (s *Store) Next() (*Identity, error) { return s.load(pointerNext) }

func (s *Store) load(pointer string) (*Identity, error) {
	b, err := os.ReadFile(filepath.Join(s.dir, pointer))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, ErrNotProvisioned
	}
	if err != nil {
		return nil, fmt.Errorf("identity store: %w", err)
	}
	gen := strings.TrimSpace(string(b))
	if !validGen(gen) {
		return nil, fmt.Errorf("identity store: %s pointer %q is corrupt; re-provision with `gwagent provision`", pointer, gen)
	}
	gdir := filepath.Join(s.dir, gen)
	var id Identity
	raw, err := os.ReadFile(filepath.Join(gdir, identityFile))
	if err != nil {
		return nil, fmt.Errorf("identity store: %s: %w", gen, err)
	}
	if err := json.Unmarshal(raw, &id); err != nil {
		return nil, fmt.Errorf("identity store: %s/%s is corrupt: %v; re-provision with `gwagent provision`", gen, identityFile, err)
	}
	id.Generation = gen
	id.ChainPath = filepath.Join(gdir, chainFile)
	pemBytes, err := os.ReadFile(id.ChainPath)
	if err != nil {
		return nil, fmt.Errorf("identity store: %w", err)
	}
	for rest := pemBytes; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("identity store: %s: %w", id.ChainPath, err)
		}
		id.Chain = append(id.Chain, c)
	}
	if len(id.Chain) == 0 {
		return nil, fmt.Errorf("identity store: %s holds no certificate; re-provision with `gwagent provision`", id.ChainPath)
	}
	return &id, nil
}

func validGen(g string) bool {
	n, ok := strings.CutPrefix(g, "gen-")
	if !ok || len(n) == 0 {
		return false
	}
	_, err := strconv.ParseUint(n, 10, 32)
	return err == nil
}

// Stage writes id with its chain as a new generation, complete and durable,
// and points "next" at it. The current identity is untouched. If it fails
// (a full disk), the partial generation is removed again.
func (s *Store) Stage(id *Identity, chain []*x509.Certificate) (staged *Identity, err error) {
	gen, err := s.newGen()
	if err != nil {
		return nil, err
	}
	gdir := filepath.Join(s.dir, gen)
	if err := os.Mkdir(gdir, 0o700); err != nil {
		return nil, fmt.Errorf("identity store: %w", err)
	}
	defer func() {
		if err != nil {
			// Nothing names gdir yet ("next" is written last): removing
			// it needs no space and leaves the store as it was.
			os.RemoveAll(gdir)
		}
	}()
	var buf bytes.Buffer
	for _, c := range chain {
		pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	if err := atomicfile.Write(filepath.Join(gdir, chainFile), buf.Bytes(), 0o644); err != nil {
		return nil, fmt.Errorf("identity store: %w", err)
	}
	s.step("chain-written")
	leaf := chain[0]
	rec := *id
	rec.Serial = FormatSerial(leaf.SerialNumber)
	rec.NotBefore, rec.NotAfter = leaf.NotBefore.UTC(), leaf.NotAfter.UTC()
	raw, _ := json.MarshalIndent(&rec, "", "  ")
	if err := atomicfile.Write(filepath.Join(gdir, identityFile), append(raw, '\n'), 0o600); err != nil {
		return nil, fmt.Errorf("identity store: %w", err)
	}
	s.step("identity-written")
	if err := atomicfile.Write(filepath.Join(s.dir, pointerNext), []byte(gen+"\n"), 0o600); err != nil {
		return nil, fmt.Errorf("identity store: %w", err)
	}
	s.step("staged")
	rec.Generation, rec.ChainPath, rec.Chain = gen, filepath.Join(gdir, chainFile), chain
	return &rec, nil
}

// Commit makes the staged generation current (one atomic rename) and
// clears "next". It returns the identity that was current before, or nil.
func (s *Store) Commit() (previous *Identity, err error) {
	if _, err := s.Next(); err != nil {
		return nil, fmt.Errorf("identity store: commit: nothing staged: %w", err)
	}
	prev, _ := s.Current() // a missing or unreadable current identity is what we replace
	// "next" becomes "current" by renaming it: one atomic step that needs
	// no free block or inode, so a full disk cannot stop the commit.
	if err := os.Rename(filepath.Join(s.dir, pointerNext), filepath.Join(s.dir, pointerCurrent)); err != nil {
		return nil, fmt.Errorf("identity store: commit: %w", err)
	}
	if err := atomicfile.SyncDir(s.dir); err != nil {
		return prev, fmt.Errorf("identity store: commit: %w", err)
	}
	s.step("committed")
	return prev, nil
}

// Discard drops the staged generation (rollback).
func (s *Store) Discard() error {
	err := atomicfile.Remove(filepath.Join(s.dir, pointerNext))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("identity store: discard: %w", err)
	}
	return s.Prune()
}

// Save stages id and commits it at once (first provisioning).
func (s *Store) Save(id *Identity, chain []*x509.Certificate) (*Identity, error) {
	staged, err := s.Stage(id, chain)
	if err != nil {
		return nil, err
	}
	if _, err := s.Commit(); err != nil {
		s.Discard() // nothing half-stored: the previous identity, if any, stays
		return nil, err
	}
	return staged, nil
}

// Prune removes generations that neither pointer names.
func (s *Store) Prune() error {
	keep := map[string]bool{}
	for _, p := range []string{pointerCurrent, pointerNext} {
		if b, err := os.ReadFile(filepath.Join(s.dir, p)); err == nil {
			keep[strings.TrimSpace(string(b))] = true
		}
	}
	gens, err := s.gens()
	if err != nil {
		return err
	}
	for _, g := range gens {
		if !keep[g] {
			if err := os.RemoveAll(filepath.Join(s.dir, g)); err != nil {
				return fmt.Errorf("identity store: prune: %w", err)
			}
		}
	}
	return nil
}

func (s *Store) gens() ([]string, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("identity store: %w", err)
	}
	var out []string
	for _, e := range ents {
		if e.IsDir() && validGen(e.Name()) {
			out = append(out, e.Name())
		}
	}
	sort.Strings(out)
	return out, nil
}

// newGen picks a generation name above every existing one, so an
// interrupted write's leftover is never reused half-written.
func (s *Store) newGen() (string, error) {
	gens, err := s.gens()
	if err != nil {
		return "", err
	}
	n := 0
	for _, g := range gens {
		v, _ := strconv.Atoi(strings.TrimPrefix(g, "gen-"))
		if v > n {
			n = v
		}
	}
	return fmt.Sprintf("gen-%06d", n+1), nil
}
