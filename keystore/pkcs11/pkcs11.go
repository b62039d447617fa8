//go:build cgo && !nopkcs11

// Package pkcs11 is the PKCS#11 key store: ECDSA P-384 key pairs generated on
// a token (an HSM, a smart card, SoftHSM2) through crypto11. Private keys are
// token objects with CKA_SENSITIVE=true and CKA_EXTRACTABLE=false: the token
// signs, nothing reads the key out.
//
// A URI selects the module (module-path=), the token (token=, serial= or
// slot-id=), the key (object= label and/or id=) and the user PIN
// (pin-source=FILE, which also serves systemd credentials, or pin-value=,
// which is redacted everywhere).
package pkcs11

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"
	"sync"

	"github.com/ThalesGroup/crypto11"
	"github.com/miekg/pkcs11"

	"github.com/gwagent/gwagent/keystore"
)

// Supported reports whether this build can use PKCS#11 tokens.
const Supported = true

// Store is one logged-in token.
type Store struct {
	mu    sync.Mutex
	ctx   *crypto11.Context
	token string
}

var (
	_ keystore.KeyStore   = (*Store)(nil)
	_ keystore.KeyDeleter = (*Store)(nil)
)

// Open loads the module, finds the token and logs in with the URI's PIN.
func Open(ctx context.Context, u *keystore.URI) (keystore.KeyStore, error) {
	module := u.Query["module-path"]
	if _, err := os.Stat(module); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("pkcs11: %w: module %s not found; install it (SoftHSM2: apt install softhsm2) or fix module-path=", keystore.ErrDeviceAbsent, module)
	}
	pin, err := u.PIN()
	if err != nil {
		return nil, fmt.Errorf("pkcs11: %w", err)
	}
	cfg := &crypto11.Config{Path: module, TokenLabel: u.Attrs["token"], TokenSerial: u.Attrs["serial"], Pin: pin}
	token := describeToken(u)
	if s := u.Attrs["slot-id"]; s != "" && cfg.TokenLabel == "" && cfg.TokenSerial == "" {
		n, _ := strconv.Atoi(s)
		cfg.SlotNumber = &n
	} else if cfg.TokenLabel != "" && cfg.TokenSerial != "" {
		cfg.TokenSerial = "" // the label selects; crypto11 takes exactly one
	}
	c11, err := crypto11.Configure(cfg)
	if err != nil {
		return nil, classify(err, token, u)
	}
	return &Store{ctx: c11, token: token}, nil
}

func describeToken(u *keystore.URI) string {
	switch {
	case u.Attrs["token"] != "":
		return "token " + strconv.Quote(u.Attrs["token"])
	case u.Attrs["serial"] != "":
		return "token with serial " + u.Attrs["serial"]
	}
	return "slot " + u.Attrs["slot-id"]
}

// vanishing reports whether err is one a token gives when an object
// another session destroys is being read.
func vanishing(err error) bool {
	var rv pkcs11.Error
	if !errors.As(err, &rv) {
		return false
	}
	switch rv {
	case pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_ATTRIBUTE_VALUE_INVALID:
		return true
	}
	return false
}

// classify maps PKCS#11 failures to keystore errors with advice. It never
// includes the PIN.
func classify(err error, token string, u *keystore.URI) error {
	var rv pkcs11.Error
	if errors.As(err, &rv) {
		switch rv {
		case pkcs11.CKR_PIN_INCORRECT:
			return fmt.Errorf("pkcs11: %w: the PIN was rejected by %s; check %s (a few more wrong PINs lock the token)", keystore.ErrBadPIN, token, pinSource(u))
		case pkcs11.CKR_PIN_LOCKED:
			return fmt.Errorf("pkcs11: %w: the user PIN of %s is locked; reset it with the token's SO PIN", keystore.ErrBadPIN, token)
		case pkcs11.CKR_PIN_LEN_RANGE, pkcs11.CKR_PIN_INVALID:
			return fmt.Errorf("pkcs11: %w: the PIN from %s has an invalid length or characters for %s", keystore.ErrBadPIN, pinSource(u), token)
		case pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_SLOT_ID_INVALID:
			return fmt.Errorf("pkcs11: %w: %s is not present; insert it or check the URI", keystore.ErrTokenAbsent, token)
		case pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_GENERAL_ERROR:
			// SoftHSM2 answers CKR_GENERAL_ERROR when it cannot write its
			// token directory (a full file system): say so, or the user
			// looks for a broken device.
			return fmt.Errorf("pkcs11: %w: %s reports a device error (%v); a software token such as SoftHSM2 also reports this when it cannot write its token directory (a full file system: df -h, df -i there)", keystore.ErrDeviceAbsent, token, rv)
		}
		return fmt.Errorf("pkcs11: %s: %v", token, rv)
	}
	if err.Error() == "could not find PKCS#11 token" {
		return fmt.Errorf("pkcs11: %w: no %s in module %s; list tokens with `softhsm2-util --show-slots` or `pkcs11-tool --list-slots`", keystore.ErrTokenAbsent, token, u.Query["module-path"])
	}
	return fmt.Errorf("pkcs11: %s: %w", token, err)
}

func pinSource(u *keystore.URI) string {
	if s := u.Query["pin-source"]; s != "" {
		return "the pin-source file " + s
	}
	return "the URI's pin-value"
}

// keyIDs returns the CKA_ID and CKA_LABEL the URI names (nil when absent).
func keyIDs(u *keystore.URI) (id, label []byte) {
	if v := u.Attrs["id"]; v != "" {
		id = []byte(v)
	}
	if v := u.Attrs["object"]; v != "" {
		label = []byte(v)
	}
	if id == nil {
		id = label // crypto11 wants an id; the label serves
	}
	return id, label
}

func (s *Store) find(u *keystore.URI) (crypto11.Signer, error) {
	id, label := keyIDs(u)
	ks, err := s.ctx.FindKeyPairs(id, label)
	// Finding a key pair is several calls: find the objects, then read
	// their attributes. Another session (the agent deleting its old key
	// after a renewal while `gwagent check` looks) may destroy an object in
	// between. Tokens say so in different words: CKR_OBJECT_HANDLE_INVALID,
	// and from SoftHSM2 also CKR_GENERAL_ERROR or
	// CKR_ATTRIBUTE_VALUE_INVALID. The lookup is made again, and then no
	// longer finds the object; an error that stays is reported.
	for try := 0; try < 3 && vanishing(err); try++ {
		ks, err = s.ctx.FindKeyPairs(id, label)
	}
	if err != nil {
		return nil, classify(err, s.token, u)
	}
	if len(ks) == 0 {
		return nil, nil
	}
	return ks[0], nil
}

// CreateKey generates a P-384 key pair on the token.
func (s *Store) CreateKey(ctx context.Context, u *keystore.URI) (crypto.Signer, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if k, err := s.find(u); err != nil {
		return nil, err
	} else if k != nil {
		return nil, fmt.Errorf("pkcs11 create: %w: %s already holds object %q", keystore.ErrKeyExists, s.token, u.Attrs["object"])
	}
	id, label := keyIDs(u)
	pub, err := crypto11.NewAttributeSetWithIDAndLabel(id, label)
	if err != nil {
		return nil, err
	}
	priv := pub.Copy()
	// Stated explicitly, whatever the library's defaults.
	priv.AddIfNotPresent([]*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
	})
	k, err := s.ctx.GenerateECDSAKeyPairWithAttributes(pub, priv, elliptic.P384())
	if err != nil {
		var rv pkcs11.Error
		if errors.As(err, &rv) && (rv == pkcs11.CKR_CURVE_NOT_SUPPORTED || rv == pkcs11.CKR_DOMAIN_PARAMS_INVALID) {
			return nil, fmt.Errorf("pkcs11 create: %w: %s cannot make P-384 keys", keystore.ErrUnsupportedCurve, s.token)
		}
		return nil, fmt.Errorf("pkcs11 create: %w", classify(err, s.token, u))
	}
	return wrap(k)
}

// Signer opens an existing key.
func (s *Store) Signer(ctx context.Context, u *keystore.URI) (crypto.Signer, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k, err := s.find(u)
	if err != nil {
		return nil, err
	}
	if k == nil {
		return nil, fmt.Errorf("pkcs11: %w: no key %q on %s", keystore.ErrKeyNotFound, u.Attrs["object"], s.token)
	}
	return wrap(k)
}

// DeleteKey destroys the key pair.
func (s *Store) DeleteKey(ctx context.Context, u *keystore.URI) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	k, err := s.find(u)
	if err != nil {
		return err
	}
	if k == nil {
		return fmt.Errorf("pkcs11 delete: %w: no key %q on %s", keystore.ErrKeyNotFound, u.Attrs["object"], s.token)
	}
	if err := k.Delete(); err != nil {
		return fmt.Errorf("pkcs11 delete: %w", classify(err, s.token, u))
	}
	return nil
}

// Close logs out and releases the module.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ctx == nil {
		return nil
	}
	err := s.ctx.Close()
	s.ctx = nil
	return err
}

// signer enforces gwagent's rules (P-384, SHA-384/256 digests) around a
// crypto11 key.
type signer struct {
	k   crypto11.Signer
	pub *ecdsa.PublicKey
}

func wrap(k crypto11.Signer) (crypto.Signer, error) {
	pub, ok := k.Public().(*ecdsa.PublicKey)
	if !ok || !keystore.IsP384(pub) {
		return nil, fmt.Errorf("pkcs11: %w: the key is not ECDSA P-384", keystore.ErrUnsupportedCurve)
	}
	return &signer{k: k, pub: pub}, nil
}

func (s *signer) Public() crypto.PublicKey { return s.pub }

func (s *signer) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := keystore.CheckDigest(digest, opts); err != nil {
		return nil, err
	}
	sig, err := s.k.Sign(r, digest, opts)
	if err != nil {
		return nil, fmt.Errorf("pkcs11 sign: %w", err)
	}
	return sig, nil
}

// attribute reads one attribute of the private key (tests check
// CKA_EXTRACTABLE and CKA_SENSITIVE).
func (s *Store) attribute(k crypto.Signer, a crypto11.AttributeType) ([]byte, error) {
	sg, ok := k.(*signer)
	if !ok {
		return nil, errors.New("not a pkcs11 signer")
	}
	at, err := s.ctx.GetAttribute(sg.k, a)
	if err != nil {
		return nil, err
	}
	return at.Value, nil
}
