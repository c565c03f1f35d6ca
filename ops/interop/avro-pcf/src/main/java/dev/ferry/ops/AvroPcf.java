package dev.ferry.ops;

import java.io.BufferedReader;
import java.io.BufferedWriter;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.OutputStreamWriter;
import java.nio.charset.StandardCharsets;

import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;

/**
 * Reads one Avro schema (JSON) per non-empty stdin line and prints, per schema, one line:
 * {@code <fingerprint>\t<parsing canonical form>}, where the fingerprint is the CRC-64-AVRO
 * (Rabin) of the PCF as 16 lowercase hex digits of its 8 bytes in little-endian order (the order
 * Avro single-object encoding writes it). A schema that fails to parse prints
 * {@code ERROR\t<message>} instead. Always exits 0.
 */
public final class AvroPcf {
  private AvroPcf() {}

  public static void main(String[] args) throws IOException {
    BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    BufferedWriter out = new BufferedWriter(new OutputStreamWriter(System.out, StandardCharsets.UTF_8));
    String line;
    while ((line = in.readLine()) != null) {
      if (line.trim().isEmpty()) {
        continue;
      }
      String result;
      try {
        // A new Parser per line, so named types from earlier lines do not clash.
        Schema schema = new Schema.Parser().parse(line);
        String pcf = SchemaNormalization.toParsingForm(schema);
        long fp = SchemaNormalization.parsingFingerprint64(schema);
        result = littleEndianHex(fp) + "\t" + pcf;
      } catch (Exception | Error e) { // e.g. SchemaParseException, AvroRuntimeException, StackOverflowError
        String msg = e.getClass().getSimpleName() + ": " + e.getMessage();
        result = "ERROR\t" + msg.replaceAll("[\\t\\r\\n]", " ");
      }
      out.write(result);
      out.write('\n');
      out.flush();
    }
    out.flush();
    System.exit(0);
  }

  /** The 8 bytes of {@code v}, least significant first, as 16 lowercase hex digits. */
  static String littleEndianHex(long v) {
    StringBuilder sb = new StringBuilder(16);
    for (int i = 0; i < 8; i++) {
      sb.append(String.format("%02x", (v >>> (8 * i)) & 0xff));
    }
    return sb.toString();
  }
}
