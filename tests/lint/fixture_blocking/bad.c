/* Fixture for the lint's own test: loop code that blocks. The lint must
   reject this file (ctest runs it with WILL_FAIL). */
static void on_readable(void *conn) {
  PQexec(conn, "SELECT 1");
}
