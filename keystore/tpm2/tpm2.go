// Package tpm2 is the TPM 2.0 key store: ECDSA P-384 keys created inside the
// TPM under the storage root key, with fixedTPM, fixedParent and
// sensitiveDataOrigin set, so the private key never exists outside the TPM.
//
// A key lives at a persistent handle (handle=0x81000100), in a key blob file
// (blob=PATH: the TPM-wrapped private part and the public part, useless
// without this TPM), or both. The TPM is a character device (/dev/tpmrm0,
// the kernel's resource manager) or, for tests and demos, a swtpm Unix
// socket (socket=PATH).
//
// Every operation takes the store's lock and flushes every transient object
// it loaded, on success and on error. What a killed process left loaded in
// a TPM without a resource manager (a swtpm socket, /dev/tpm0) is flushed
// when the next Store opens it.
package tpm2

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"encoding/asn1"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	tpm "github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"

	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/keystore"
)

// srkHandle is where a provisioned platform keeps the standard SRK; if it is
// absent, gwagent creates it there once (see srk).
const srkHandle = tpm.TPMHandle(0x81000001)

// Store is one open TPM.
type Store struct {
	mu     sync.Mutex
	tpm    transport.TPMCloser
	name   string
	noP384 error                           // set when the TPM lacks P-384: keys fail, attestation works
	saved  map[tpm.TPMHandle]*savedPrimary // attest.go: RSA EK and SRK contexts by hierarchy
	closed bool

	staleFlushed int // handles a dead process left, flushed by Open

	// mem, on a TPM without a resource manager, sees the TPM run out of
	// room for objects or sessions (see locked); nil otherwise.
	mem *memWatch
	// leakFlushed counts handles flushed after Open because the TPM was
	// full of them; onLeak, if set, hears of each such flush.
	leakFlushed int
	onLeak      func(n int)
}

var (
	_ keystore.KeyStore   = (*Store)(nil)
	_ keystore.KeyDeleter = (*Store)(nil)
)

// absentError is a TPM whose device node (or swtpm socket) does not exist:
// keystore.ErrDeviceAbsent, and the *fs.PathError of the node, so that a
// caller can tell when that node appears.
type absentError struct {
	msg  string
	stat error
}

func (e *absentError) Error() string   { return e.msg }
func (e *absentError) Unwrap() []error { return []error{keystore.ErrDeviceAbsent, e.stat} }

// Open opens the TPM that u names and probes it for P-384 (see New).
func Open(ctx context.Context, u *keystore.URI) (keystore.KeyStore, error) {
	path, socket := u.TPMDevice()
	st, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		hint := "check that the TPM is enabled in firmware and its driver loaded (ls /dev/tpm*); without a TPM, configure PKCS#11 or file: keys, and symmetric-key or X.509 onboarding instead of TPM attestation"
		if socket {
			hint = "start swtpm (socket mode) or fix socket="
		}
		return nil, &absentError{msg: fmt.Sprintf("tpm2: %v: no TPM at %s; %s", keystore.ErrDeviceAbsent, path, hint), stat: err}
	}
	if err != nil {
		return nil, fmt.Errorf("tpm2: %s: %w", path, err)
	}
	var tr transport.TPMCloser
	if socket {
		if st.Mode()&fs.ModeSocket == 0 {
			return nil, fmt.Errorf("tpm2: %w: %s is not a Unix socket; socket= is for swtpm, device= for /dev/tpmrm0", keystore.ErrBadURI, path)
		}
		tr, err = linuxudstpm.Open(path)
	} else {
		tr, err = linuxtpm.Open(path)
	}
	switch {
	case errors.Is(err, syscall.EBUSY):
		return nil, fmt.Errorf("tpm2: %w: %s is in use by another process; use /dev/tpmrm0 (the resource manager) instead of /dev/tpm0", keystore.ErrDeviceBusy, path)
	case errors.Is(err, syscall.EPERM):
		// EACCES is the file mode; EPERM is a device policy (systemd's
		// DeviceAllow=, resolved when the service started).
		return nil, fmt.Errorf("tpm2: %w: opening %s is not permitted by the service's device policy; allow it with DeviceAllow=char-tpm rw (a DeviceAllow= path does not cover a TPM that appeared after the service started)", keystore.ErrDeviceAbsent, path)
	case errors.Is(err, fs.ErrPermission):
		return nil, fmt.Errorf("tpm2: %w: no permission to open %s; add the service user to group tss", keystore.ErrDeviceAbsent, path)
	case err != nil:
		return nil, fmt.Errorf("tpm2: open %s: %w", path, err)
	}
	hint := "check the TPM driver's messages (dmesg | grep -i tpm)"
	if socket {
		hint = "is swtpm running? Start it again on its state directory"
	}
	var mem *memWatch
	if socket || !managed(path) {
		mem = &memWatch{TPMCloser: tr}
		tr = mem
	}
	s, err := New(answering{TPMCloser: tr, name: path, hint: hint}, path)
	if err != nil {
		tr.Close()
		return nil, err
	}
	if mem != nil {
		s.mem = mem
		s.staleFlushed = s.flushStale()
	}
	return s, nil
}

// memWatch notes a TPM answering that it has no room left for another
// object or session. It looks at the response code itself: several
// callers report a TPM's refusal as text (%v), and the code must not be
// lost. Used under the Store's lock.
type memWatch struct {
	transport.TPMCloser
	full bool
}

func (m *memWatch) Send(cmd []byte) ([]byte, error) {
	rsp, err := m.TPMCloser.Send(cmd)
	if err == nil && len(rsp) >= 10 {
		switch tpm.TPMRC(binary.BigEndian.Uint32(rsp[6:10])) {
		case tpm.TPMRCObjectMemory, tpm.TPMRCSessionMemory, tpm.TPMRCSessionHandles:
			m.full = true
		}
	}
	return rsp, err
}

// answering marks a failure to reach the TPM at all (swtpm gone, the
// device node's driver unbound: the command got no answer) as
// keystore.ErrDeviceAbsent, naming the TPM and what to do. A TPM's own
// refusal (a response code) is not a transport error and stays as it is.
// The agent retries ErrDeviceAbsent with backoff and reports it as the key
// store being unavailable, not as a refused credential.
type answering struct {
	transport.TPMCloser
	name, hint string
}

func (a answering) Send(cmd []byte) ([]byte, error) {
	rsp, err := a.TPMCloser.Send(cmd)
	if err != nil {
		return nil, fmt.Errorf("%w: the TPM at %s stopped answering (%v); %s", keystore.ErrDeviceAbsent, a.name, err, a.hint)
	}
	return rsp, nil
}

// lockout explains TPM_RC_LOCKOUT: keys made before gwagent
// set NoDA, and DPS's HMAC key, are subject to dictionary-attack
// protection, which a TPM also triggers after unclean resets.
func (s *Store) lockout(err error) error {
	if !errors.Is(err, tpm.TPMRCLockout) {
		return err
	}
	every := "a while"
	if rsp, cerr := (tpm.GetCapability{Capability: tpm.TPMCapTPMProperties, Property: uint32(tpm.TPMPTLockoutInterval), PropertyCount: 1}).Execute(s.tpm); cerr == nil {
		if p, perr := rsp.CapabilityData.Data.TPMProperties(); perr == nil && len(p.TPMProperty) == 1 && p.TPMProperty[0].Property == tpm.TPMPTLockoutInterval {
			every = (time.Duration(p.TPMProperty[0].Value) * time.Second).String()
		}
	}
	return fmt.Errorf("%w: the TPM at %s is in dictionary-attack lockout; it counts every reset without an orderly shutdown (power loss, swtpm killed) as a failed authorization. It forgives one every %s by itself; to unlock it at once, run `tpm2_dictionarylockout --clear-lockout` (with the lockout password, if one is set)", err, s.name, every)
}

// managed reports whether path is the kernel's TPM resource manager
// (/dev/tpmrm*, possibly through a symlink), which flushes a process's
// transient objects and sessions when it exits.
func managed(path string) bool {
	if p, err := filepath.EvalSymlinks(path); err == nil {
		path = p
	}
	return strings.HasPrefix(filepath.Base(path), "tpmrm")
}

// staleKinds are the handle types a process leaves loaded in a TPM when it
// dies in the middle of an operation: transient objects, loaded sessions
// and saved (context-gapped) sessions.
var staleKinds = []tpm.TPMHT{tpm.TPMHTTransient, tpm.TPMHTHMACSession, tpm.TPMHTPolicySession}

// flushStale flushes every transient object and session in a TPM that has
// no resource manager (a swtpm socket, /dev/tpm0). Without one, what a
// killed process had loaded stays in the TPM until its next reset, and a
// TPM has only a few object slots (libtpms: 3): after a kill or two, every
// operation would fail with TPM_RC_OBJECT_MEMORY, and the device would
// never provision again. Every Store operation flushes what it loads before
// it returns, so nothing of ours is loaded when a Store opens; /dev/tpm0
// admits one process at a time, so nothing loaded is another live
// process's either. A swtpm socket is shared by whoever connects (each
// command is its own connection): it is for tests and demos, one TPM client
// at a time. It returns the number of handles flushed (best effort: a TPM
// that cannot list or flush them fails the next operation with its own
// error).
func (s *Store) flushStale() int {
	n := 0
	for _, ht := range staleKinds {
		hs, _ := s.handles(ht)
		for _, h := range hs {
			if _, err := (tpm.FlushContext{FlushHandle: h}).Execute(s.tpm); err == nil {
				n++
			}
		}
	}
	return n
}

// handles lists the handles of one kind the TPM holds. A session query
// answers with HMAC and policy session handles alike (0x02... and
// 0x03...): TPM_HT_HMAC_SESSION asks for the loaded sessions,
// TPM_HT_POLICY_SESSION for the saved ones. A TPM holds a few objects and
// at most a few dozen sessions: one query returns them all.
func (s *Store) handles(ht tpm.TPMHT) ([]tpm.TPMHandle, error) {
	rsp, err := tpm.GetCapability{Capability: tpm.TPMCapHandles, Property: uint32(ht) << 24, PropertyCount: 128}.Execute(s.tpm)
	if err != nil {
		return nil, fmt.Errorf("tpm2: listing handles: %w", err)
	}
	l, err := rsp.CapabilityData.Data.Handles()
	if err != nil {
		return nil, fmt.Errorf("tpm2: listing handles: %w", err)
	}
	var out []tpm.TPMHandle
	for _, h := range l.Handle {
		switch k := tpm.TPMHT(uint32(h) >> 24); {
		case k == ht, ht != tpm.TPMHTTransient && (k == tpm.TPMHTHMACSession || k == tpm.TPMHTPolicySession):
			out = append(out, h)
		}
	}
	return out, nil
}

// StaleFlushed is the number of transient objects and sessions left by a
// process that died in the middle of a TPM operation, flushed when this
// Store opened a TPM without a resource manager.
func (s *Store) StaleFlushed() int { return s.staleFlushed }

// LeakFlushed is the number of transient objects and sessions flushed
// since Open because another program left the TPM (one without a resource
// manager) full of them.
func (s *Store) LeakFlushed() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.leakFlushed
}

// New makes a Store over an open TPM transport and probes for P-384. A TPM
// without P-384 still opens (its endorsement key can be the onboarding
// credential), but every key operation fails with ErrUnsupportedCurve.
func New(tr transport.TPMCloser, name string) (*Store, error) {
	s := &Store{tpm: tr, name: name}
	rsp, err := tpm.GetCapability{Capability: tpm.TPMCapECCCurves, PropertyCount: 64}.Execute(tr)
	if errors.Is(err, keystore.ErrDeviceAbsent) {
		return nil, fmt.Errorf("tpm2: %w", err)
	}
	if err != nil {
		return nil, fmt.Errorf("tpm2: %w: the TPM at %s does not answer (%v); check the device or restart swtpm", keystore.ErrDeviceAbsent, name, err)
	}
	curves, err := rsp.CapabilityData.Data.ECCCurves()
	if err != nil {
		return nil, fmt.Errorf("tpm2: reading the TPM's curves: %w", err)
	}
	for _, c := range curves.ECCCurves {
		if c == tpm.TPMECCNistP384 {
			return s, nil
		}
	}
	s.noP384 = fmt.Errorf("tpm2: %w: the TPM at %s has no NIST P-384 (it lists %v); Azure issues only for P-384 keys, so use a PKCS#11 token or a file: key on this device (its endorsement key can still be the onboarding credential)", keystore.ErrUnsupportedCurve, name, curves.ECCCurves)
	return s, nil
}

// Close closes the TPM connection.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	return s.tpm.Close()
}

// keyTemplate is the P-384 signing key: never leaves the TPM.
var keyTemplate = tpm.TPMTPublic{
	Type:    tpm.TPMAlgECC,
	NameAlg: tpm.TPMAlgSHA256,
	ObjectAttributes: tpm.TPMAObject{
		FixedTPM:            true,
		FixedParent:         true,
		SensitiveDataOrigin: true,
		UserWithAuth:        true,
		SignEncrypt:         true,
		// The key has no authorization value, so dictionary-attack
		// protection guards nothing; but a TPM counts every reset without
		// TPM2_Shutdown after a DA-protected key was used (a power cut, a
		// killed swtpm) as a failed authorization, and after a few (3 on
		// swtpm, often 32 on chips) refuses every DA-protected key for
		// hours: a gateway on flaky power would lose its identity.
		NoDA: true,
	},
	Parameters: tpm.NewTPMUPublicParms(tpm.TPMAlgECC, &tpm.TPMSECCParms{
		CurveID: tpm.TPMECCNistP384,
		// No fixed scheme: each Sign names ECDSA with SHA-384 (or SHA-256,
		// which TLS 1.2 peers may ask for).
		Scheme: tpm.TPMTECCScheme{Scheme: tpm.TPMAlgNull},
	}),
	Unique: tpm.NewTPMUPublicID(tpm.TPMAlgECC, &tpm.TPMSECCPoint{}),
}

// locked runs f with the TPM lock held.
//
// On a TPM without a resource manager, another program that leaks objects
// or sessions after Open (a crash, a tpm2-tools command killed half way)
// fills the TPM's few slots, and every operation would fail with
// TPM_RC_OBJECT_MEMORY or TPM_RC_SESSION_MEMORY until the agent restarts.
// So when f failed and the TPM said it was full, the stale handles are
// flushed and f runs once more. That is safe for the same reasons as the
// flush at Open: f has returned and flushed everything it loaded (every
// operation does, on success and on error), the lock keeps any other
// operation of this Store out, and such a TPM serves one client at a time
// (/dev/tpm0 is exclusive; a swtpm socket is documented as one client), so
// nothing loaded in it is in use. Every f is safe to run again: an
// operation that fails leaves no half-made key behind.
func (s *Store) locked(f func() error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("tpm2: key store is closed")
	}
	if s.mem == nil {
		return f()
	}
	s.mem.full = false
	err := f()
	if err == nil || !s.mem.full {
		return err
	}
	n := s.flushStale()
	if n == 0 {
		return err
	}
	s.leakFlushed += n
	if s.onLeak != nil {
		s.onLeak(n)
	}
	s.mem.full = false
	return f()
}

// OnLeakFlushed sets a function told how many handles were flushed each
// time an operation found the TPM full of another program's leftovers (see
// locked); it runs with the store's lock held and must not use the store.
// Set it before the store is shared.
func (s *Store) OnLeakFlushed(f func(n int)) { s.onLeak = f }

func (s *Store) flush(h tpm.TPMHandle) {
	_, _ = tpm.FlushContext{FlushHandle: h}.Execute(s.tpm)
}

// srk returns the storage root key and a release function to call when
// done with it (callers hold s.mu; the TPM-attestation code may call it the
// same way). The SRK is the standard one (TCG provisioning guidance: the
// ECC P-256 SRK template at 0x81000001): if that handle holds a storage key
// it is used as is; if it is empty the SRK is created once and made
// persistent there, so no later start pays for CreatePrimary (hundreds of
// milliseconds on real TPM chips). If the handle holds something else, or
// the TPM refuses to persist (owner password set, no NV space), the SRK is
// created for each operation and flushed after, as before.
func (s *Store) srk() (tpm.AuthHandle, func(), error) {
	rp, err := (tpm.ReadPublic{ObjectHandle: srkHandle}).Execute(s.tpm)
	if errors.Is(err, keystore.ErrDeviceAbsent) || warning(err) {
		return tpm.AuthHandle{}, nil, fmt.Errorf("tpm2: reading the storage root key: %w", err)
	}
	if err == nil {
		if isStorageKey(&rp.OutPublic) {
			return tpm.AuthHandle{Handle: srkHandle, Name: rp.Name, Auth: tpm.PasswordAuth(nil)}, func() {}, nil
		}
	}
	rsp, cerr := tpm.CreatePrimary{PrimaryHandle: tpm.TPMRHOwner, InPublic: tpm.New2B(tpm.ECCSRKTemplate)}.Execute(s.tpm)
	if errors.Is(cerr, keystore.ErrDeviceAbsent) {
		return tpm.AuthHandle{}, nil, fmt.Errorf("tpm2: creating the storage root key: %w", cerr)
	}
	if cerr != nil {
		return tpm.AuthHandle{}, nil, fmt.Errorf("tpm2: creating the storage root key: %w (is the owner hierarchy password-protected?)", cerr)
	}
	transient := tpm.AuthHandle{Handle: rsp.ObjectHandle, Name: rsp.Name, Auth: tpm.PasswordAuth(nil)}
	release := func() { s.flush(rsp.ObjectHandle) }
	if err == nil { // the handle is taken by another kind of object: leave it alone
		return transient, release, nil
	}
	_, perr := tpm.EvictControl{
		Auth:             tpm.TPMRHOwner,
		ObjectHandle:     &tpm.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name},
		PersistentHandle: srkHandle,
	}.Execute(s.tpm)
	if perr != nil {
		return transient, release, nil
	}
	release()
	return tpm.AuthHandle{Handle: srkHandle, Name: rsp.Name, Auth: tpm.PasswordAuth(nil)}, func() {}, nil
}

// warning reports whether err is a TPM warning: a passing condition (no
// room for another object or session, busy, self-testing), not an answer
// about the handle asked for. A key must not be taken for gone (and
// replaced) because the TPM was full.
func warning(err error) bool {
	var rc tpm.TPMRC
	return errors.As(err, &rc) && rc.IsWarning()
}

// isStorageKey: a restricted decryption key that cannot leave the TPM, as
// an SRK is.
func isStorageKey(p *tpm.TPM2BPublic) bool {
	pub, err := p.Contents()
	if err != nil {
		return false
	}
	a := pub.ObjectAttributes
	return a.Restricted && a.Decrypt && !a.SignEncrypt && a.FixedTPM && a.FixedParent
}

// persisted returns the name of the object at persistent handle h, or
// ok=false if there is none.
// A TPM that does not answer is an error, not an empty handle: a key must
// not be taken for gone (and replaced) because swtpm was restarting.
func (s *Store) persisted(h uint32) (tpm.TPM2BName, *tpm.TPM2BPublic, bool, error) {
	rp, err := (tpm.ReadPublic{ObjectHandle: tpm.TPMHandle(h)}).Execute(s.tpm)
	if errors.Is(err, keystore.ErrDeviceAbsent) || warning(err) {
		return tpm.TPM2BName{}, nil, false, fmt.Errorf("tpm2: reading handle 0x%08X: %w", h, err)
	}
	if err != nil {
		return tpm.TPM2BName{}, nil, false, nil
	}
	return rp.Name, &rp.OutPublic, true, nil
}

// checkOurs refuses an object at a persistent handle that is not a P-384
// signing key like the ones gwagent makes (a storage key at 0x81000001, an
// endorsement key, another program's key): gwagent must neither sign with it
// nor evict it.
func checkOurs(h uint32, p *tpm.TPM2BPublic) error {
	pub, err := p.Contents()
	if err == nil && pub.Type == tpm.TPMAlgECC && pub.ObjectAttributes.SignEncrypt &&
		!pub.ObjectAttributes.Restricted && !pub.ObjectAttributes.Decrypt {
		if parms, perr := pub.Parameters.ECCDetail(); perr == nil && parms.CurveID == tpm.TPMECCNistP384 {
			return nil
		}
	}
	return fmt.Errorf("tpm2: handle 0x%08X holds another kind of object (not a P-384 signing key); gwagent will not use or delete it: pick a free handle", h)
}

// CreateKey creates a P-384 key in the TPM and stores it where u says.
func (s *Store) CreateKey(ctx context.Context, u *keystore.URI) (crypto.Signer, error) {
	if s.noP384 != nil {
		return nil, s.noP384
	}
	handle, err := u.Handle()
	if err != nil {
		return nil, err
	}
	blob := u.Attrs["blob"]
	var sig *signer
	err = s.locked(func() error {
		if handle != 0 {
			_, _, ok, err := s.persisted(handle)
			if err != nil {
				return err
			}
			if ok {
				return fmt.Errorf("tpm2 create: %w at handle 0x%08X", keystore.ErrKeyExists, handle)
			}
		}
		if blob != "" {
			if _, err := os.Lstat(blob); err == nil {
				return fmt.Errorf("tpm2 create: %w at %s", keystore.ErrKeyExists, blob)
			}
		}
		parent, release, err := s.srk()
		if err != nil {
			return err
		}
		defer release()
		cr, err := tpm.Create{ParentHandle: parent, InPublic: tpm.New2B(keyTemplate)}.Execute(s.tpm)
		if err != nil {
			return fmt.Errorf("tpm2 create: %w", err)
		}
		pub, err := publicKey(&cr.OutPublic)
		if err != nil {
			return err
		}
		if blob != "" {
			if err := writeBlob(blob, &cr.OutPublic, &cr.OutPrivate); err != nil {
				return err
			}
		}
		if handle != 0 {
			ld, err := tpm.Load{ParentHandle: parent, InPrivate: cr.OutPrivate, InPublic: cr.OutPublic}.Execute(s.tpm)
			if err != nil {
				if blob != "" {
					os.Remove(blob)
				}
				return fmt.Errorf("tpm2 create: load: %w", err)
			}
			defer s.flush(ld.ObjectHandle)
			_, err = tpm.EvictControl{
				Auth:             tpm.TPMRHOwner,
				ObjectHandle:     &tpm.NamedHandle{Handle: ld.ObjectHandle, Name: ld.Name},
				PersistentHandle: tpm.TPMHandle(handle),
			}.Execute(s.tpm)
			if err != nil {
				if blob != "" {
					os.Remove(blob)
				}
				return fmt.Errorf("tpm2 create: persisting at 0x%08X: %w", handle, err)
			}
		}
		sig = &signer{s: s, handle: handle, blob: blob, pub: pub}
		return nil
	})
	return sig, err
}

// Signer opens the key u names: at its persistent handle if it is there,
// else from its blob file.
func (s *Store) Signer(ctx context.Context, u *keystore.URI) (crypto.Signer, error) {
	if s.noP384 != nil {
		return nil, s.noP384
	}
	handle, err := u.Handle()
	if err != nil {
		return nil, err
	}
	blob := u.Attrs["blob"]
	var sig *signer
	err = s.locked(func() error {
		if handle != 0 {
			_, pub, ok, err := s.persisted(handle)
			if err != nil {
				return err
			}
			if ok {
				if err := checkOurs(handle, pub); err != nil {
					return err
				}
				k, err := publicKey(pub)
				if err != nil {
					return err
				}
				sig = &signer{s: s, handle: handle, pub: k}
				return nil
			}
		}
		if blob != "" {
			pub, _, err := readBlob(blob)
			if err != nil {
				return err
			}
			k, err := publicKey(pub)
			if err != nil {
				return err
			}
			sig = &signer{s: s, blob: blob, pub: k}
			return nil
		}
		return fmt.Errorf("tpm2: %w at handle 0x%08X", keystore.ErrKeyNotFound, handle)
	})
	return sig, err
}

// DeleteKey evicts the persistent key and removes the blob file.
func (s *Store) DeleteKey(ctx context.Context, u *keystore.URI) error {
	handle, err := u.Handle()
	if err != nil {
		return err
	}
	blob := u.Attrs["blob"]
	return s.locked(func() error {
		found := false
		if handle != 0 {
			name, pub, ok, err := s.persisted(handle)
			if err != nil {
				return err
			}
			if ok {
				if err := checkOurs(handle, pub); err != nil {
					return err
				}
				_, err := tpm.EvictControl{
					Auth:             tpm.TPMRHOwner,
					ObjectHandle:     &tpm.NamedHandle{Handle: tpm.TPMHandle(handle), Name: name},
					PersistentHandle: tpm.TPMHandle(handle),
				}.Execute(s.tpm)
				if err != nil {
					return fmt.Errorf("tpm2 delete: evicting 0x%08X: %w", handle, err)
				}
				found = true
			}
		}
		if blob != "" {
			err := atomicfile.Remove(blob)
			if err == nil {
				found = true
			} else if !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("tpm2 delete: %w", err)
			}
		}
		if !found {
			return fmt.Errorf("tpm2 delete: %w", keystore.ErrKeyNotFound)
		}
		return nil
	})
}

// transientHandles lists loaded transient objects (tests check for leaks).
func (s *Store) transientHandles() ([]tpm.TPMHandle, error) {
	var hs []tpm.TPMHandle
	err := s.locked(func() error {
		var err error
		hs, err = s.handles(tpm.TPMHTTransient)
		return err
	})
	return hs, err
}

// signer is a TPM-resident key.
type signer struct {
	s      *Store
	handle uint32 // persistent handle, or 0
	blob   string // blob file when not persistent
	pub    *ecdsa.PublicKey
}

func (k *signer) Public() crypto.PublicKey { return k.pub }

// Sign signs a SHA-384 (or SHA-256) digest inside the TPM and returns an
// ASN.1 DER ECDSA signature.
func (k *signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := keystore.CheckDigest(digest, opts); err != nil {
		return nil, err
	}
	hash := tpm.TPMAlgSHA384
	if opts.HashFunc() == crypto.SHA256 {
		hash = tpm.TPMAlgSHA256
	}
	var out []byte
	err := k.s.locked(func() error {
		key, release, err := k.load()
		if err != nil {
			return err
		}
		defer release()
		rsp, err := tpm.Sign{
			KeyHandle: key,
			Digest:    tpm.TPM2BDigest{Buffer: digest},
			InScheme: tpm.TPMTSigScheme{
				Scheme:  tpm.TPMAlgECDSA,
				Details: tpm.NewTPMUSigScheme(tpm.TPMAlgECDSA, &tpm.TPMSSchemeHash{HashAlg: hash}),
			},
			Validation: tpm.TPMTTKHashCheck{Tag: tpm.TPMSTHashCheck, Hierarchy: tpm.TPMRHNull},
		}.Execute(k.s.tpm)
		if err != nil {
			return fmt.Errorf("tpm2 sign: %w", k.s.lockout(err))
		}
		sig, err := rsp.Signature.Signature.ECDSA()
		if err != nil {
			return fmt.Errorf("tpm2 sign: %w", err)
		}
		out, err = asn1.Marshal(struct{ R, S *big.Int }{
			new(big.Int).SetBytes(sig.SignatureR.Buffer), new(big.Int).SetBytes(sig.SignatureS.Buffer)})
		return err
	})
	return out, err
}

// load makes the key usable: the persistent handle as is, or the blob
// loaded under the SRK (flushed by release).
func (k *signer) load() (tpm.AuthHandle, func(), error) {
	s := k.s
	if k.handle != 0 {
		name, _, ok, err := s.persisted(k.handle)
		if err != nil {
			return tpm.AuthHandle{}, nil, err
		}
		if !ok {
			return tpm.AuthHandle{}, nil, fmt.Errorf("tpm2: %w: handle 0x%08X was evicted", keystore.ErrKeyNotFound, k.handle)
		}
		return tpm.AuthHandle{Handle: tpm.TPMHandle(k.handle), Name: name, Auth: tpm.PasswordAuth(nil)}, func() {}, nil
	}
	pub, priv, err := readBlob(k.blob)
	if err != nil {
		return tpm.AuthHandle{}, nil, err
	}
	parent, releaseSRK, err := s.srk()
	if err != nil {
		return tpm.AuthHandle{}, nil, err
	}
	ld, err := tpm.Load{ParentHandle: parent, InPrivate: *priv, InPublic: *pub}.Execute(s.tpm)
	releaseSRK()
	if errors.Is(err, keystore.ErrDeviceAbsent) {
		return tpm.AuthHandle{}, nil, fmt.Errorf("tpm2: loading %s: %w", k.blob, err)
	}
	if err != nil {
		return tpm.AuthHandle{}, nil, fmt.Errorf("tpm2: loading %s: %w (was the blob made by another TPM, or was the TPM cleared?)", k.blob, err)
	}
	return tpm.AuthHandle{Handle: ld.ObjectHandle, Name: ld.Name, Auth: tpm.PasswordAuth(nil)}, func() { s.flush(ld.ObjectHandle) }, nil
}

func publicKey(p *tpm.TPM2BPublic) (*ecdsa.PublicKey, error) {
	pub, err := p.Contents()
	if err != nil {
		return nil, fmt.Errorf("tpm2: public area: %w", err)
	}
	k, err := tpm.Pub(*pub)
	if err != nil {
		return nil, fmt.Errorf("tpm2: public key: %w", err)
	}
	ek, ok := k.(*ecdsa.PublicKey)
	if !ok || !keystore.IsP384(ek) {
		return nil, fmt.Errorf("tpm2: %w: the key is not ECDSA P-384", keystore.ErrUnsupportedCurve)
	}
	return ek, nil
}

// Blob files: two PEM blocks, the TPM2B_PUBLIC and the TPM-wrapped
// TPM2B_PRIVATE. 0600 although the private part is only usable inside this
// TPM.
const (
	pemPublic  = "TPM2 PUBLIC"
	pemPrivate = "TPM2 PRIVATE"
)

func writeBlob(path string, pub *tpm.TPM2BPublic, priv *tpm.TPM2BPrivate) error {
	b := pem.EncodeToMemory(&pem.Block{Type: pemPublic, Bytes: tpm.Marshal(pub)})
	b = append(b, pem.EncodeToMemory(&pem.Block{Type: pemPrivate, Bytes: tpm.Marshal(priv)})...)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("tpm2: %w", err)
	}
	if err := atomicfile.Create(path, b, 0o600); err != nil {
		return fmt.Errorf("tpm2: writing key blob: %w", err)
	}
	return nil
}

func readBlob(path string) (*tpm.TPM2BPublic, *tpm.TPM2BPrivate, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, fmt.Errorf("tpm2: %w: no key blob at %s", keystore.ErrKeyNotFound, path)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("tpm2: %w", err)
	}
	var pubDER, privDER []byte
	for blk, rest := pem.Decode(b); blk != nil; blk, rest = pem.Decode(rest) {
		switch blk.Type {
		case pemPublic:
			pubDER = blk.Bytes
		case pemPrivate:
			privDER = blk.Bytes
		}
	}
	if pubDER == nil || privDER == nil {
		return nil, nil, fmt.Errorf("tpm2: %s is not a gwagent TPM key blob", path)
	}
	pub, err := tpm.Unmarshal[tpm.TPM2BPublic](pubDER)
	if err != nil {
		return nil, nil, fmt.Errorf("tpm2: %s: %w", path, err)
	}
	priv, err := tpm.Unmarshal[tpm.TPM2BPrivate](privDER)
	if err != nil {
		return nil, nil, fmt.Errorf("tpm2: %s: %w", path, err)
	}
	return pub, priv, nil
}
