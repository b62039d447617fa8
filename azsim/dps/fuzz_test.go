package dps

// Fuzz targets for what DPS parses from a hostile client: TPM public areas
// (the endorsement and storage root keys of a TPM registration), SAS
// tokens and registration bodies. `make test` runs them with a count budget.

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

var (
	testRSAOnce sync.Once
	testRSA     *rsa.PrivateKey
)

// testKey is one RSA-2048 key for the whole package's tests.
func testKey(t testing.TB) *rsa.PrivateKey {
	testRSAOnce.Do(func() {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatal(err)
		}
		testRSA = k
	})
	return testRSA
}

// publicArea builds a TPM2B_PUBLIC of an RSA storage key the way a TPM
// shapes the TCG EK and SRK templates, with the fields a test varies.
type publicArea struct {
	typ, nameAlg, symAlg, symBits, mode, scheme, bits uint16
	attrs, exp                                        uint32
	policy, mod                                       []byte
}

func goodArea(k *rsa.PrivateKey) publicArea {
	return publicArea{typ: algRSA, nameAlg: algSHA256, symAlg: algAES, symBits: 128, mode: algCFB, scheme: algNull,
		bits: 2048, attrs: attrFixedTPM | attrFixedParent | attrSensitiveDataOrigin | attrRestricted | attrDecrypt,
		policy: make([]byte, 32), mod: k.N.FillBytes(make([]byte, 256))}
}

func (p publicArea) bytes() []byte {
	var b []byte
	b = binary.BigEndian.AppendUint16(b, p.typ)
	b = binary.BigEndian.AppendUint16(b, p.nameAlg)
	b = binary.BigEndian.AppendUint32(b, p.attrs)
	b = appendSized(b, p.policy)
	b = binary.BigEndian.AppendUint16(b, p.symAlg)
	if p.symAlg != algNull {
		b = binary.BigEndian.AppendUint16(b, p.symBits)
		b = binary.BigEndian.AppendUint16(b, p.mode)
	}
	b = binary.BigEndian.AppendUint16(b, p.scheme)
	if p.scheme != algNull {
		b = binary.BigEndian.AppendUint16(b, algSHA256)
	}
	b = binary.BigEndian.AppendUint16(b, p.bits)
	b = binary.BigEndian.AppendUint32(b, p.exp)
	b = appendSized(b, p.mod)
	return appendSized(nil, b)
}

// FuzzTPMPublic: no public area panics the parser, and every key it
// accepts can be sent a challenge (a failure there would be DPS's 500 for
// the client's bad key, or a panic in the AES setup).
func FuzzTPMPublic(f *testing.F) {
	k := testKey(f)
	good := goodArea(k)
	f.Add(good.bytes())
	for _, mod := range []func(*publicArea){
		func(p *publicArea) { p.symBits = 256 },
		func(p *publicArea) { p.symBits = 64 },    // not an AES key size
		func(p *publicArea) { p.symBits = 0 },     // nor this
		func(p *publicArea) { p.symBits = 65535 }, // a huge KDFa
		func(p *publicArea) { p.exp = 2 },         // even exponent
		func(p *publicArea) { p.exp = 1 },
		func(p *publicArea) { p.exp = 0xffffffff },
		func(p *publicArea) { p.mod = make([]byte, 256) }, // zero modulus
		func(p *publicArea) { p.mod[255] &^= 1 },          // even modulus
		func(p *publicArea) { p.mod[0] = 0 },              // short modulus
		func(p *publicArea) { p.mod = p.mod[:128] },
		func(p *publicArea) { p.scheme = algSHA256 },
		func(p *publicArea) { p.symAlg = algNull },
		func(p *publicArea) { p.typ = 0x0023 }, // ECC
		func(p *publicArea) { p.attrs = attrSign },
	} {
		p := goodArea(k)
		p.mod = append([]byte(nil), p.mod...)
		mod(&p)
		f.Add(p.bytes())
	}
	b := good.bytes()
	f.Add(b[:len(b)/2])                     // truncated
	f.Add(append(b, 0))                     // trailing byte
	f.Add([]byte{0xff, 0xff})               // a size with nothing behind it
	f.Add(append([]byte{0x01, 0x00}, b...)) // wrong outer size
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		key, err := parseRSAPublic(b)
		if err != nil {
			return
		}
		if len(key.name) != 34 || key.pub == nil {
			t.Fatalf("accepted key without a name or public key: %+v", key)
		}
		if _, _, err := tpmChallenge(key, key); err != nil {
			t.Fatalf("accepted a key that cannot be challenged: %v", err)
		}
	})
}

// FuzzSASToken: no token panics the parser or the checks, and no token
// verifies under two different keys (signatures are not ignored).
func FuzzSASToken(f *testing.F) {
	now := time.Unix(1_800_000_000, 0)
	d := &DPS{cfg: Config{IDScope: "0ne00AZSIM0"}, now: func() time.Time { return now }}
	keyA, keyB := make([]byte, 32), make([]byte, 32)
	keyB[0] = 1
	good := sasToken("0ne00AZSIM0/registrations/dev-1", keyA, now.Add(time.Hour).Unix())
	f.Add(good)
	f.Add(sasToken("0ne00AZSIM0/registrations/dev-1", keyA, now.Add(-time.Hour).Unix())) // expired
	f.Add(sasToken("0ne00AZSIM0/registrations/other", keyA, now.Add(time.Hour).Unix()))  // another device
	f.Add(strings.Replace(good, "skn=registration", "skn=iothubowner", 1))
	f.Add(strings.Replace(good, "se=", "se=-", 1))
	f.Add(strings.Replace(good, "se=", "se=99999999999999999999", 1))
	f.Add("SharedAccessSignature sr=%zz&sig=%&se=1&skn=registration")
	f.Add("SharedAccessSignature ")
	f.Add("Bearer abc")
	f.Add("SharedAccessSignature sr=a&sr=b&sig=AAAA&se=1&skn=registration&skn=registration")
	f.Fuzz(func(t *testing.T, tok string) {
		errA := d.checkTPMToken(tok, "dev-1", keyA)
		errB := d.checkTPMToken(tok, "dev-1", keyB)
		if errA == nil && errB == nil {
			t.Fatalf("token %q verified under two keys", tok)
		}
		if sr, rawSR, sig, se, err := parseSAS(tok); err == nil {
			a := signatureOK(base64.StdEncoding.EncodeToString(keyA), rawSR, sr, se, sig)
			b := signatureOK(base64.StdEncoding.EncodeToString(keyB), rawSR, sr, se, sig)
			if a && b {
				t.Fatalf("token %q verified under two keys", tok)
			}
		}
	})
}

// FuzzRegisterBody: no body panics the decoder; one it accepts never names
// another registration id.
func FuzzRegisterBody(f *testing.F) {
	for _, s := range []string{``, `{}`, `{"registrationId":"dev-1"}`, `{"registrationId":"DEV-1","csr":"AAAA"}`,
		`{"registrationId":"dev-2"}`, `{"tpm":{"endorsementKey":"AAAA","storageRootKey":null}}`, `{"payload":{"a":[1,2,{"b":null}]}}`,
		`[`, `{"csr":1}`, `{"tpm":"x"}`, strings.Repeat(`[`, 20000), `{"registrationId":"dev-1"} trailing`, "\xff\xfe{}", `null`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		status := 0
		body, ok := decodeRegister(raw, "dev-1", "path", func(st, _ int, _ []byte) { status = st })
		if ok != (status == 0) || !ok && status != 400 {
			t.Fatalf("ok %v with status %d", ok, status)
		}
		if ok && body.RegistrationID != "" && !strings.EqualFold(body.RegistrationID, "dev-1") {
			t.Fatalf("accepted a body for %q", body.RegistrationID)
		}
	})
}

// FuzzRegistrationID: the rules hold for every id checkRegistrationID lets through.
func FuzzRegistrationID(f *testing.F) {
	for _, s := range []string{"dev-1", "a", "A.b_c:d-", "dev.", "../x", "a/b", "dev 1", "dév", strings.Repeat("a", 128), strings.Repeat("a", 129), "", "a\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		if checkRegistrationID(id) != nil {
			return
		}
		if len(id) < 1 || len(id) > 128 || strings.Trim(id, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._:") != "" ||
			strings.ContainsAny(id[len(id)-1:], "._:") {
			t.Fatalf("accepted %q", id)
		}
	})
}

// sasToken is a DPS SAS token for resource sr signed with key.
func sasToken(sr string, key []byte, se int64) string {
	m := hmac.New(sha256.New, key)
	fmt.Fprintf(m, "%s\n%d", url.QueryEscape(sr), se)
	sig := base64.StdEncoding.EncodeToString(m.Sum(nil))
	return "SharedAccessSignature sr=" + url.QueryEscape(sr) + "&sig=" + url.QueryEscape(sig) +
		"&se=" + strconv.FormatInt(se, 10) + "&skn=registration"
}

// The fuzz seeds' verdicts, so that the properties above are not vacuous:
// the good key and token pass, each damaged one fails with a clear reason.
func TestParsersOnSeeds(t *testing.T) {
	k := testKey(t)
	if _, err := parseRSAPublic(goodArea(k).bytes()); err != nil {
		t.Fatalf("good area refused: %v", err)
	}
	for name, c := range map[string]struct {
		mod  func(*publicArea)
		want string
	}{
		"AES-64":        {func(p *publicArea) { p.symBits = 64 }, "AES-64"},
		"AES-0":         {func(p *publicArea) { p.symBits = 0 }, "AES-0"},
		"even exponent": {func(p *publicArea) { p.exp = 2 }, "exponent"},
		"exponent 1":    {func(p *publicArea) { p.exp = 1 }, "exponent"},
		"even modulus":  {func(p *publicArea) { p.mod[255] &^= 1 }, "modulus"},
		"short modulus": {func(p *publicArea) { p.mod[0] = 0 }, "modulus"},
		"RSA 1024":      {func(p *publicArea) { p.mod = p.mod[:128] }, "RSA 2048"},
		"ECC":           {func(p *publicArea) { p.typ = 0x0023 }, "want an RSA key"},
		"signing key":   {func(p *publicArea) { p.attrs = attrSign }, "restricted decryption"},
		"no AES":        {func(p *publicArea) { p.symAlg = algNull }, "no AES"},
	} {
		p := goodArea(k)
		p.mod = append([]byte(nil), p.mod...)
		c.mod(&p)
		if _, err := parseRSAPublic(p.bytes()); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err %v, want one about %q", name, err, c.want)
		}
	}

	now := time.Unix(1_800_000_000, 0)
	d := &DPS{cfg: Config{IDScope: "0ne00AZSIM0"}, now: func() time.Time { return now }}
	key, other := make([]byte, 32), make([]byte, 32)
	other[0] = 1
	if err := d.checkTPMToken(sasToken("0ne00AZSIM0/registrations/dev-1", key, now.Add(time.Hour).Unix()), "dev-1", key); err != nil {
		t.Fatalf("good token refused: %v", err)
	}
	for tok, want := range map[string]string{
		sasToken("0ne00AZSIM0/registrations/dev-1", key, now.Unix()):                  "expired",
		sasToken("0ne00AZSIM0/registrations/dev-2", key, now.Add(time.Hour).Unix()):   "is not",
		sasToken("0ne00AZSIM0/registrations/dev-1", other, now.Add(time.Hour).Unix()): "not signed",
		"SharedAccessSignature sr=x&sig=%zz&se=1&skn=registration":                    "malformed",
		"Basic dXNlcjpwYXNz": "not a SharedAccessSignature",
	} {
		if err := d.checkTPMToken(tok, "dev-1", key); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: err %v, want one about %q", tok, err, want)
		}
	}
}
